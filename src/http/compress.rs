//! Compression of SSE responses (`Content-Encoding: br` or `gzip`), flushed
//! with every body chunk so that compression never delays an event.
//!
//! An SSE body is long-lived and mostly idle, and the broker holds tens of
//! thousands of them, so what matters is what an idle stream costs. A live
//! compressor is large whatever its settings: zlib-rs always allocates a
//! 128 KiB hash table (about 260 KiB in all here), brotli's smallest hasher
//! that still matches across chunks about 320 KiB. So no stream keeps one.
//! Each chunk gets a compressor of its own, dropped once the chunk is
//! compressed and flushed; between chunks a stream keeps only the last bytes
//! it sent (its *history*: 2 KiB for gzip, 2032 bytes for brotli), which the
//! next chunk's compressor takes as its dictionary, so an event still
//! compresses against the ones before it. A compressor then lives only inside
//! one `poll`: at most one per worker thread.
//!
//! That a chunk's compressor carries on the stream of the one before:
//! - gzip: a sync flush ends every chunk on a byte boundary with no block
//!   open, and a deflate match may reach back 32 KiB into whatever earlier
//!   blocks wrote, so a fresh raw deflate primed with the history continues
//!   the stream. The gzip header, CRC-32 and length are written here.
//! - brotli: a decoder also carries the last four distances and the last two
//!   bytes (literal context) across meta-blocks. rust-brotli's "catable" mode,
//!   made for concatenating brotli streams, never uses distances from before
//!   its start and writes its first two bytes uncompressed; after the first
//!   chunk it also writes no stream header ("bare stream"). Its custom
//!   dictionary is the history. The stream ends with an empty last
//!   meta-block.
//!
//! The tests decode the output after every chunk: it always holds every byte
//! given so far.
//!
//! Measured (`cargo test --release --lib http::compress::tests::figures --
//! --ignored --nocapture`, with mimalloc as in the daemon; 100 JSON events of
//! ~190 bytes, one per chunk; 2 busy cores, so times are rough):
//!
//! | | idle stream | during a chunk | bytes out / in | per event |
//! | --- | --- | --- | --- | --- |
//! | gzip (level 6, 2 KiB window) | 2.1 KiB | 253 KiB | 0.195 | 8–10 µs |
//! | brotli (quality 3, 1 KiB window) | 1.0 KiB | 309 KiB | 0.234 | 10–13 µs |
//!
//! (Measured with a 1 KiB brotli window; it is 2 KiB now, see `BROTLI_LGWIN`.)
//! An event longer than the window (a multi-topic stream over many topics
//! has ids of several hundred bytes) matches only within itself.
//!
//! Ten events per chunk: 0.119 (gzip), 0.104 (brotli), under 2 µs per event.
//! A compressor kept alive per stream would give 0.195 and 0.186 per event
//! for 3.5 and 6.5 µs, but hold 251 and 308 KiB per stream, idle or not.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use brotli::enc::backward_references::UnionHasher;
use brotli::enc::encode::{
    BrotliEncoderOperation, BrotliEncoderParameter, BrotliEncoderStateStruct,
};
use brotli::enc::StandardAlloc;
use bytes::Bytes;
use flate2::{Compression, FlushCompress};
use futures_util::Stream;
#[cfg(test)]
use futures_util::StreamExt;

/// A content coding of SSE responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    /// `gzip` (RFC 1952).
    Gzip,
    /// `br` (RFC 7932).
    Brotli,
}

impl Coding {
    /// The token of `Content-Encoding`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Brotli => "br",
        }
    }
}

/// The coding to answer a request with, from its `Accept-Encoding` (RFC 9110
/// §12.5.3); `None` = identity.
///
/// The highest q-value wins, gzip over brotli at equal q (one event per
/// chunk, the common case, comes out smaller and cheaper with gzip here:
/// see BENCHMARKS.md). `q=0` refuses a
/// coding; `*` stands for every coding not listed by name; `x-gzip` is gzip.
/// Identity is chosen over the codings only when listed with a higher q. An
/// entry with a malformed q-value, or a header value that is not visible
/// ASCII, is ignored. Several entries for one coding: the lowest q counts (a
/// refusal stays a refusal).
pub(crate) fn negotiate(headers: &HeaderMap) -> Option<Coding> {
    let (mut br, mut gzip, mut identity, mut any) = (None, None, None, None);
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for entry in value.split(',') {
            let mut parts = entry.split(';');
            let name = parts.next().unwrap_or_default().trim_matches(OWS);
            let mut q = Some(1000);
            for param in parts {
                if let Some((key, value)) = param.split_once('=') {
                    if key.trim_matches(OWS).eq_ignore_ascii_case("q") {
                        q = parse_q(value.trim_matches(OWS));
                    }
                }
            }
            let Some(q) = q else { continue };
            let slot = if name.eq_ignore_ascii_case("br") {
                &mut br
            } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                &mut gzip
            } else if name.eq_ignore_ascii_case("identity") {
                &mut identity
            } else if name == "*" {
                &mut any
            } else {
                continue;
            };
            *slot = Some(slot.map_or(q, |old: u16| old.min(q)));
        }
    }
    let br = br.or(any).unwrap_or(0);
    let gzip = gzip.or(any).unwrap_or(0);
    let (coding, q) = if br > gzip {
        (Coding::Brotli, br)
    } else {
        (Coding::Gzip, gzip)
    };
    (q > 0 && identity.is_none_or(|identity| identity <= q)).then_some(coding)
}

/// Optional whitespace (RFC 9110 §5.6.3).
const OWS: &[char] = &[' ', '\t'];

/// A q-value in thousandths: `0`, `0.5`, `0.125`, `1`, `1.000`.
fn parse_q(text: &str) -> Option<u16> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, digit| n * 10 + u16::from(digit - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// zlib's default level. On one event per chunk, level 9 was 6% smaller and
/// level 1 13% larger; on batches level 9 took a quarter more time.
const GZIP_LEVEL: u32 = 6;
/// A 2 KiB window: as good as 32 KiB on events of a few hundred bytes, and
/// what a stream keeps between chunks. With 1 KiB, events of 800 bytes
/// compressed half as well.
const GZIP_WINDOW_BITS: u8 = 11;
/// Bytes of history a gzip stream keeps: its whole window.
const GZIP_HISTORY: usize = 1 << GZIP_WINDOW_BITS;
/// Brotli's smallest quality that matches across chunks (0 and 1 compress
/// each chunk on its own: 0.9 of the input for one event; 2 gives 0.3).
const BROTLI_QUALITY: u32 = 3;
/// A 2 KiB window, as gzip's: on events of a few hundred bytes 1 KiB did as
/// well, but a multi-topic stream over 50 topics has events of ~1.1 KiB
/// (their ids), which a 1 KiB window cannot match against the one before
/// (0.77 of identity measured, 0.09 with 2 KiB; BENCHMARKS.md).
const BROTLI_LGWIN: u32 = 11;
/// Bytes of history a brotli stream keeps: its window less brotli's 16-byte
/// gap, the most a custom dictionary holds.
const BROTLI_HISTORY: usize = (1 << BROTLI_LGWIN) - 16;

/// The gzip header: deflate, no name or time, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// A final, empty deflate block with fixed codes (BFINAL=1, BTYPE=01, EOB).
const DEFLATE_END: [u8; 2] = [0x03, 0x00];
/// An empty last brotli meta-block (ISLAST=1, ISLASTEMPTY=1), on the byte
/// boundary every flushed chunk ends on.
const BROTLI_END: u8 = 0x03;
/// A whole empty brotli stream (16-bit window, then an empty last block).
const BROTLI_EMPTY: u8 = 0x06;

/// One response body's compressor: [`compress`](Self::compress) each chunk,
/// then [`finish`](Self::finish). All the output so far always decodes to
/// all the input so far.
///
/// Between chunks it holds only its history (see the module docs).
pub(crate) struct Compressor {
    coding: Coding,
    /// The last bytes given: the next chunk's dictionary.
    history: Vec<u8>,
    /// Whether anything was written (the gzip header, brotli's first chunk).
    started: bool,
    /// CRC-32 of the input, for the gzip trailer.
    crc: crc32fast::Hasher,
    /// Length of the input modulo 2^32, for the gzip trailer.
    len: u32,
}

impl Compressor {
    /// A compressor for a new body.
    pub(crate) fn new(coding: Coding) -> Self {
        Self {
            coding,
            history: Vec::new(),
            started: false,
            crc: crc32fast::Hasher::new(),
            len: 0,
        }
    }

    /// The compressed bytes for `chunk`, flushed: with them the peer can
    /// decode all of `chunk`. Empty for an empty chunk.
    pub(crate) fn compress(&mut self, chunk: &[u8]) -> Bytes {
        if chunk.is_empty() {
            return Bytes::new();
        }
        // Room for the typical output; both loops below grow it as needed.
        let mut out = Vec::with_capacity(chunk.len() / 2 + 64);
        match self.coding {
            Coding::Gzip => {
                if !self.started {
                    out.extend_from_slice(&GZIP_HEADER);
                }
                self.deflate(chunk, &mut out);
                self.crc.update(chunk);
                // RFC 1952: ISIZE is the length modulo 2^32.
                self.len = self.len.wrapping_add(chunk.len() as u32);
                remember(&mut self.history, chunk, GZIP_HISTORY);
            }
            Coding::Brotli => {
                self.brotli(chunk, &mut out);
                remember(&mut self.history, chunk, BROTLI_HISTORY);
            }
        }
        self.started = true;
        Bytes::from(out)
    }

    /// The end of the stream: what follows the last chunk's bytes.
    pub(crate) fn finish(self) -> Bytes {
        match self.coding {
            Coding::Gzip => {
                let mut out = Vec::with_capacity(GZIP_HEADER.len() + DEFLATE_END.len() + 8);
                if !self.started {
                    out.extend_from_slice(&GZIP_HEADER);
                }
                out.extend_from_slice(&DEFLATE_END);
                out.extend_from_slice(&self.crc.finalize().to_le_bytes());
                out.extend_from_slice(&self.len.to_le_bytes());
                Bytes::from(out)
            }
            Coding::Brotli if self.started => Bytes::from_static(&[BROTLI_END]),
            Coding::Brotli => Bytes::from_static(&[BROTLI_EMPTY]),
        }
    }

    /// Appends `chunk` as raw deflate blocks ending in a sync flush.
    fn deflate(&self, chunk: &[u8], out: &mut Vec<u8>) {
        let fresh = || {
            flate2::Compress::new_with_window_bits(
                Compression::new(GZIP_LEVEL),
                false,
                GZIP_WINDOW_BITS,
            )
        };
        let mut z = fresh();
        if !self.history.is_empty() && z.set_dictionary(&self.history).is_err() {
            // Cannot happen (a new raw stream takes a dictionary); without
            // one the output is still valid, only larger.
            z = fresh();
        }
        let mut input = chunk;
        loop {
            out.reserve(input.len() / 2 + 64);
            let before = z.total_in();
            z.compress_vec(input, out, FlushCompress::Sync)
                // Only a misused stream fails (zlib's Z_STREAM_ERROR).
                .expect("raw deflate with room to write does not fail");
            input = &input[(z.total_in() - before) as usize..];
            // Room left over means the flush is complete.
            if input.is_empty() && out.len() < out.capacity() {
                return;
            }
        }
    }

    /// Appends `chunk` as brotli meta-blocks ending in a flush.
    fn brotli(&self, chunk: &[u8], out: &mut Vec<u8>) {
        use BrotliEncoderParameter::*;

        let mut encoder = BrotliEncoderStateStruct::new(StandardAlloc::default());
        // Valid values of known parameters: each call returns true.
        encoder.set_parameter(BROTLI_PARAM_QUALITY, BROTLI_QUALITY);
        encoder.set_parameter(BROTLI_PARAM_LGWIN, BROTLI_LGWIN);
        encoder.set_parameter(BROTLI_PARAM_CATABLE, 1);
        encoder.set_parameter(BROTLI_PARAM_BYTE_ALIGN, 1);
        if self.started {
            encoder.set_parameter(BROTLI_PARAM_BARE_STREAM, 1);
        }
        if !self.history.is_empty() {
            // `true`: the history is what precedes this input, so its last
            // two bytes are the literal context.
            encoder.set_custom_dictionary_with_optional_precomputed_hasher(
                self.history.len(),
                &self.history,
                UnionHasher::Uninit,
                true,
            );
        }
        let (mut available_in, mut in_offset) = (chunk.len(), 0);
        let mut written = out.len();
        out.resize(out.capacity(), 0);
        loop {
            let mut available_out = out.len() - written;
            let ok = encoder.compress_stream(
                BrotliEncoderOperation::BROTLI_OPERATION_FLUSH,
                &mut available_in,
                chunk,
                &mut in_offset,
                &mut available_out,
                out,
                &mut written,
                &mut None,
                &mut |_, _, _, _| (),
            );
            // Only invalid parameters or a misused stream fail.
            assert!(ok, "brotli flush with valid parameters does not fail");
            if available_in == 0 && !encoder.has_more_output() {
                break;
            }
            if written == out.len() {
                out.resize(out.len() * 2, 0);
            }
        }
        out.truncate(written);
    }
}

/// Keeps the last `keep` bytes of `history` followed by `chunk`.
fn remember(history: &mut Vec<u8>, chunk: &[u8], keep: usize) {
    if history.capacity() == 0 {
        history.reserve_exact(keep);
    }
    if chunk.len() >= keep {
        history.clear();
        history.extend_from_slice(&chunk[chunk.len() - keep..]);
    } else {
        let excess = (history.len() + chunk.len()).saturating_sub(keep);
        history.drain(..excess);
        history.extend_from_slice(chunk);
    }
}

/// `stream` compressed with `coding`: one flushed output per non-empty input
/// chunk, then the end of the compressed stream. Empty outputs are skipped.
/// (The SSE handler compresses in `sse::body`, where it counts the bytes.)
#[cfg(test)]
pub(crate) fn compress_body<S>(
    coding: Coding,
    stream: S,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let state = (Box::pin(stream), Some(Compressor::new(coding)));
    futures_util::stream::unfold(state, |(mut inner, mut compressor)| async move {
        loop {
            // `None` once the end has been sent.
            let c = compressor.as_mut()?;
            let out = match inner.next().await {
                Some(Ok(chunk)) => c.compress(&chunk),
                Some(Err(never)) => match never {},
                None => compressor.take()?.finish(),
            };
            if !out.is_empty() {
                return Some((Ok(out), (inner, compressor)));
            }
        }
    })
}

/// The `text/event-stream` response for `stream`, compressed as the request's
/// `headers` accept (see [`negotiate`]).
#[cfg(test)]
pub(crate) fn sse_response<S>(headers: &HeaderMap, stream: S) -> Response
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    match negotiate(headers) {
        Some(coding) => encoded_sse_response(Some(coding), compress_body(coding, stream)),
        None => encoded_sse_response(None, stream),
    }
}

/// The `text/event-stream` response for a body already encoded with `coding`
/// (`None`: plain text). For a handler that compresses chunks itself with a
/// [`Compressor`] (to count the bytes it hands on, say).
pub(crate) fn encoded_sse_response<S>(coding: Option<Coding>, body: S) -> Response
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let mut response = Body::from_stream(body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // Caches must key on it even when the answer is plain text.
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if let Some(coding) = coding {
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(coding.as_str()),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::Cell;
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    use axum::http::HeaderName;
    use mimalloc::MiMalloc;
    use proptest::prelude::*;

    use super::*;

    // -----------------------------------------------------------------------
    // Bytes allocated by the current thread, to measure a compressor.
    // -----------------------------------------------------------------------

    /// The daemon's allocator (mimalloc), counting what each thread holds;
    /// per thread so that tests running beside a measurement do not disturb it.
    struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn count(delta: isize) {
        // `try_with`: allocations also happen while a thread is torn down.
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    // SAFETY: every call is passed on to mimalloc unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            unsafe { MiMalloc.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(-(layout.size() as isize));
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size as isize - layout.size() as isize);
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Starts a measurement: the bytes this thread holds now.
    fn mark() -> isize {
        let live = LIVE.with(Cell::get);
        PEAK.with(|peak| peak.set(live));
        live
    }

    /// Bytes held now and at most since `mark` returned `base`, above it.
    fn since(base: isize) -> (isize, isize) {
        (LIVE.with(Cell::get) - base, PEAK.with(Cell::get) - base)
    }

    // -----------------------------------------------------------------------
    // Decoders and SSE text.
    // -----------------------------------------------------------------------

    type BrotliDecoder = brotli::BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>;

    /// Decodes a compressed body as it arrives.
    enum Decoder {
        Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
        Brotli(Box<BrotliDecoder>, bool),
    }

    impl Decoder {
        fn new(coding: Coding) -> Self {
            match coding {
                Coding::Gzip => Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
                Coding::Brotli => Decoder::Brotli(
                    Box::new(BrotliDecoder::new(
                        StandardAlloc::default(),
                        StandardAlloc::default(),
                        StandardAlloc::default(),
                    )),
                    false,
                ),
            }
        }

        /// What `bytes` complete, decoded.
        fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
            match self {
                Decoder::Gzip(d) => {
                    d.write_all(bytes).expect("gzip decodes");
                    d.flush().expect("gzip decodes");
                    std::mem::take(d.get_mut())
                }
                Decoder::Brotli(state, done) => {
                    let mut out = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    let (mut available_in, mut in_offset, mut total) = (bytes.len(), 0, 0);
                    loop {
                        let (mut available_out, mut out_offset) = (buf.len(), 0);
                        let result = brotli::BrotliDecompressStream(
                            &mut available_in,
                            &mut in_offset,
                            bytes,
                            &mut available_out,
                            &mut out_offset,
                            &mut buf,
                            &mut total,
                            state,
                        );
                        out.extend_from_slice(&buf[..out_offset]);
                        match result {
                            brotli::BrotliResult::NeedsMoreOutput => continue,
                            brotli::BrotliResult::NeedsMoreInput => break,
                            brotli::BrotliResult::ResultSuccess => {
                                assert_eq!(available_in, 0, "bytes after the end");
                                *done = true;
                                break;
                            }
                            brotli::BrotliResult::ResultFailure => panic!("brotli decode failed"),
                        }
                    }
                    out
                }
            }
        }

        /// Asserts the stream ended where it should (the gzip trailer checks
        /// CRC-32 and length).
        fn assert_finished(self) {
            match self {
                Decoder::Gzip(mut d) => d.try_finish().expect("gzip trailer"),
                Decoder::Brotli(_, done) => assert!(done, "brotli stream not ended"),
            }
        }
    }

    /// A whole compressed body, decoded in one go.
    fn decode_whole(coding: Coding, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            Coding::Gzip => {
                flate2::read::GzDecoder::new(body)
                    .read_to_end(&mut out)
                    .expect("gzip body decodes");
            }
            Coding::Brotli => {
                brotli::BrotliDecompress(&mut &body[..], &mut out).expect("brotli body decodes");
            }
        }
        out
    }

    /// One SSE message as the bridge writes it.
    fn sse_event(offset: u64) -> Vec<u8> {
        let kind = ["order.created", "order.paid", "order.shipped"][offset as usize % 3];
        format!(
            "id: 1733:{offset}\nevent: {kind}\ndata: {{\"topic\":\"orders\",\"type\":\"{kind}\",\
             \"version\":{},\"offset\":{offset},\"ts\":{},\"headers\":{{}},\"data\":{{\"id\":\"o-{offset}\",\
             \"amount\":{}.{},\"currency\":\"EUR\"}}}}\n\n",
            7 + offset / 3,
            1_733_500_000_000 + offset * 137 % 100_000,
            offset * 37 % 500,
            offset % 100,
        )
        .into_bytes()
    }

    /// Compresses `chunks` one by one and asserts that after each one the
    /// output so far decodes to exactly the input so far, and that the ended
    /// stream decodes whole.
    fn assert_round_trip(coding: Coding, chunks: &[Vec<u8>]) {
        let mut compressor = Compressor::new(coding);
        let mut decoder = Decoder::new(coding);
        let (mut wire, mut plain, mut decoded) = (Vec::new(), Vec::new(), Vec::new());
        for (i, chunk) in chunks.iter().enumerate() {
            let out = compressor.compress(chunk);
            assert_eq!(out.is_empty(), chunk.is_empty(), "{coding:?}: chunk {i}");
            wire.extend_from_slice(&out);
            plain.extend_from_slice(chunk);
            decoded.extend(decoder.feed(&out));
            assert!(
                decoded == plain,
                "{coding:?}: after chunk {i}, {} of {} bytes decode",
                decoded.len(),
                plain.len()
            );
        }
        let end = compressor.finish();
        assert!(!end.is_empty());
        decoded.extend(decoder.feed(&end));
        assert!(decoded == plain, "{coding:?}: the end added bytes");
        decoder.assert_finished();
        wire.extend_from_slice(&end);
        assert!(
            decode_whole(coding, &wire) == plain,
            "{coding:?}: whole body"
        );
    }

    const CODINGS: [Coding; 2] = [Coding::Gzip, Coding::Brotli];

    // -----------------------------------------------------------------------
    // Negotiation.
    // -----------------------------------------------------------------------

    fn accept(values: &[&[u8]]) -> Option<Coding> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                header::ACCEPT_ENCODING,
                HeaderValue::from_bytes(value).expect("a header value"),
            );
        }
        negotiate(&headers)
    }

    #[test]
    fn accept_encoding_picks_the_highest_q_gzip_on_ties_and_honours_refusals() {
        use Coding::{Brotli as B, Gzip as G};

        let table: &[(&str, Option<Coding>)] = &[
            ("", None),
            ("gzip", Some(G)),
            ("br", Some(B)),
            ("gzip, br", Some(G)),
            ("gzip, deflate, br, zstd", Some(G)),
            ("br;q=0.5, gzip", Some(G)),
            ("gzip;q=1.0, br;q=1", Some(G)),
            ("gzip;q=0.9, br", Some(B)),
            ("br;q=0.999, gzip;q=1.000", Some(G)),
            ("GZIP", Some(G)),
            ("Br", Some(B)),
            ("x-gzip", Some(G)),
            (" gzip ; q=0.8 ,\tbr ; Q = 0.7 ", Some(G)),
            ("br;q=0, gzip;q=0", None),
            ("br;q=0, gzip", Some(G)),
            ("br;q=0.000, gzip;q=0.001", Some(G)),
            ("*", Some(G)),
            ("*;q=0", None),
            ("*;q=0, gzip", Some(G)),
            ("gzip;q=0, *", Some(B)),
            ("br;q=0, *;q=0.1", Some(G)),
            ("identity", None),
            ("identity;q=0", None),
            ("identity;q=0, *;q=0", None),
            ("gzip;q=0.5, identity", None),
            ("gzip, identity;q=0.5", Some(G)),
            ("gzip;q=0.5, identity;q=0.5", Some(G)),
            ("deflate, zstd, compress", None),
            ("gzip, gzip;q=0", None),
            ("br;q=0.9, br;q=0.3, gzip;q=0.5", Some(G)),
            ("gzip;level=9", Some(G)),
            (",,, ;;, gzip", Some(G)),
            // Malformed q-values: the entry is ignored.
            ("gzip;q=2", None),
            ("gzip;q=0.1234", None),
            ("gzip;q=abc", None),
            ("gzip;q=", None),
            ("gzip;q=.5", None),
            ("gzip;q=1.001", None),
            ("gzip;q=-1", None),
            ("br;q=5, gzip", Some(G)),
            ("gzip;q=1.", Some(G)),
            ("gzip;q=0.", None),
            ("gzip ;", Some(G)),
            ("gzip;q", Some(G)),
            ("g zip, b r", None),
        ];
        for (value, want) in table {
            assert_eq!(accept(&[value.as_bytes()]), *want, "{value:?}");
        }
        let mut none = HeaderMap::new();
        assert_eq!(negotiate(&none), None, "no header");
        none.insert(
            HeaderName::from_static("x-accept-encoding"),
            HeaderValue::from_static("gzip"),
        );
        assert_eq!(negotiate(&none), None, "another header");
        // Every header line counts.
        assert_eq!(accept(&[b"br;q=0", b"gzip"]), Some(G));
        assert_eq!(accept(&[b"gzip;q=0.5", b"br"]), Some(B));
        // A line that is not visible ASCII is ignored, not the others.
        assert_eq!(accept(&[b"gzip\xff"]), None);
        assert_eq!(accept(&[b"gzip\xff", b"br"]), Some(B));
    }

    proptest! {
        #[test]
        fn negotiation_never_panics_on_arbitrary_headers(
            values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 0..3),
            text in "[a-zA-Z*;=,. 0-9\t-]{0,60}",
        ) {
            let mut headers = HeaderMap::new();
            for value in values.iter().map(|v| HeaderValue::from_bytes(v)).filter_map(Result::ok) {
                headers.append(header::ACCEPT_ENCODING, value);
            }
            let _ = negotiate(&headers);
            if let Ok(value) = HeaderValue::from_str(&text) {
                headers.append(header::ACCEPT_ENCODING, value);
            }
            let _ = negotiate(&headers);
        }
    }

    // -----------------------------------------------------------------------
    // Compression: flushed per chunk, then ended.
    // -----------------------------------------------------------------------

    #[test]
    fn every_chunk_decodes_as_soon_as_it_is_compressed() {
        let prelude = b"retry: 2000\n\nid: 1733:0\nevent: ready\ndata: {\"topic\":\"orders\"}\n\n";
        let mut chunks = vec![prelude.to_vec()];
        // Live: one event per chunk, with heartbeats and empty chunks between.
        for offset in 1..=60 {
            chunks.push(sse_event(offset));
            if offset % 20 == 0 {
                chunks.push(b": hb\n\n".to_vec());
                chunks.push(Vec::new());
            }
        }
        // Replay: batches, and one chunk larger than any window.
        chunks.push((61..71).flat_map(sse_event).collect());
        chunks.push((71..571).flat_map(sse_event).collect());
        // Edge sizes, and bytes that do not compress.
        chunks.push(b"x".to_vec());
        chunks.push(b"yz".to_vec());
        chunks.push(
            (0..5000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        );
        chunks.push(sse_event(571));
        for coding in CODINGS {
            assert_round_trip(coding, &chunks);
        }
    }

    #[test]
    fn an_empty_body_ends_as_a_complete_empty_stream() {
        for coding in CODINGS {
            assert_round_trip(coding, &[]);
            assert_round_trip(coding, &[Vec::new(), Vec::new()]);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn arbitrary_chunks_decode_after_each_one(
            chunks in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..300),
                    // Few symbols: long matches, across chunks too.
                    "[ab{}:,\"0-9\n]{0,3000}".prop_map(String::into_bytes),
                    (0u64..1000).prop_map(sse_event),
                ],
                0..16,
            ),
        ) {
            for coding in CODINGS {
                assert_round_trip(coding, &chunks);
            }
        }
    }

    #[tokio::test]
    async fn a_compressed_body_yields_one_output_per_non_empty_chunk_then_the_end() {
        for coding in CODINGS {
            let input = [sse_event(1), Vec::new(), sse_event(2), Vec::new()];
            let chunks = input.clone().map(|c| Ok(Bytes::from(c)));
            let outputs: Vec<Bytes> = compress_body(coding, futures_util::stream::iter(chunks))
                .map(|r| match r {
                    Ok(bytes) => bytes,
                    Err(never) => match never {},
                })
                .collect()
                .await;
            assert_eq!(outputs.len(), 3, "{coding:?}: two chunks and the end");
            assert!(outputs.iter().all(|o| !o.is_empty()));
            assert_eq!(decode_whole(coding, &outputs.concat()), input.concat());
        }
    }

    // -----------------------------------------------------------------------
    // Memory.
    // -----------------------------------------------------------------------

    #[test]
    fn an_idle_compressed_stream_holds_only_its_history() {
        for (coding, history) in [
            (Coding::Gzip, GZIP_HISTORY),
            (Coding::Brotli, BROTLI_HISTORY),
        ] {
            let events: Vec<Vec<u8>> = (1..=100).map(sse_event).collect();
            let base = mark();
            let mut compressor = Box::new(Compressor::new(coding));
            for event in &events {
                drop(compressor.compress(event));
            }
            let (idle, peak) = since(base);
            let most = (history + std::mem::size_of::<Compressor>()) as isize;
            assert!(idle <= most, "{coding:?}: {idle} bytes idle, over {most}");
            // A chunk's compressor lives only while it compresses.
            assert!(
                peak < 400 * 1024,
                "{coding:?}: {peak} bytes while compressing"
            );
            drop(compressor);
            assert_eq!(since(base).0, 0, "{coding:?}: all freed");
        }
    }

    /// The figures in the module docs; run in release:
    /// `cargo test --release --lib http::compress::tests::figures -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints measurements"]
    fn figures() {
        let events: Vec<Vec<u8>> = (1..=100).map(sse_event).collect();
        let raw: usize = events.iter().map(Vec::len).sum();
        println!("{} events, {raw} bytes", events.len());
        for coding in CODINGS {
            for batch in [1, 10] {
                let chunks: Vec<Vec<u8>> = events.chunks(batch).map(<[_]>::concat).collect();
                let rounds = 20;
                let mut out = 0;
                let mut idle = 0;
                let mut peak = 0;
                let start = Instant::now();
                for _ in 0..rounds {
                    let base = mark();
                    let mut compressor = Box::new(Compressor::new(coding));
                    out = chunks.iter().map(|c| compressor.compress(c).len()).sum();
                    (idle, peak) = since(base);
                }
                let ns = start.elapsed().as_nanos() / (rounds * events.len()) as u128;
                println!(
                    "{coding:?} batch {batch:2}: {idle} B idle, {peak} B peak, \
                     out/in {:.3}, {ns} ns/event",
                    out as f64 / raw as f64
                );
            }
        }
        // For comparison: one compressor kept alive per stream.
        for batch in [1, 10] {
            let chunks: Vec<Vec<u8>> = events.chunks(batch).map(<[_]>::concat).collect();
            let base = mark();
            let start = Instant::now();
            let mut z = flate2::Compress::new_with_window_bits(
                Compression::new(GZIP_LEVEL),
                false,
                GZIP_WINDOW_BITS,
            );
            let mut out = Vec::new();
            for chunk in &chunks {
                out.reserve(chunk.len() + 64);
                z.compress_vec(chunk, &mut out, FlushCompress::Sync)
                    .unwrap();
            }
            let ns = start.elapsed().as_nanos() / events.len() as u128;
            let (held, _) = since(base);
            println!(
                "kept-alive gzip batch {batch:2}: {} B held, out/in {:.3}, {ns} ns/event",
                held - out.capacity() as isize,
                (out.len() + 18) as f64 / raw as f64
            );
            let base = mark();
            let start = Instant::now();
            let mut w =
                brotli::CompressorWriter::new(Vec::new(), 256, BROTLI_QUALITY, BROTLI_LGWIN);
            for chunk in &chunks {
                w.write_all(chunk).unwrap();
                w.flush().unwrap();
            }
            let ns = start.elapsed().as_nanos() / events.len() as u128;
            let (held, _) = since(base);
            println!(
                "kept-alive brotli batch {batch:2}: {} B held, out/in {:.3}, {ns} ns/event",
                held - w.get_ref().capacity() as isize,
                w.get_ref().len() as f64 / raw as f64
            );
        }
    }

    // -----------------------------------------------------------------------
    // The response, served.
    // -----------------------------------------------------------------------

    /// Serves one `sse_response` fed by the returned sender; its URL.
    async fn serve_sse() -> (String, tokio::sync::mpsc::UnboundedSender<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
        let app = axum::Router::new().route(
            "/events",
            axum::routing::get(move |headers: HeaderMap| async move {
                let rx = rx.lock().unwrap().take().expect("one request");
                let body = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
                });
                sse_response(&headers, body)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, tx)
    }

    #[tokio::test]
    async fn a_served_sse_response_is_compressed_as_accepted_and_flushed_per_chunk() {
        for (accept, coding) in [
            ("gzip", Some(Coding::Gzip)),
            ("gzip;q=0.5, br", Some(Coding::Brotli)),
            ("identity", None),
        ] {
            let (url, tx) = serve_sse().await;
            let client = reqwest::Client::builder()
                .no_proxy()
                .no_gzip()
                .no_brotli()
                .build()
                .unwrap();
            let mut response = client
                .get(url)
                .header("accept-encoding", accept)
                .send()
                .await
                .unwrap();
            let h = response.headers();
            assert_eq!(h["content-type"], "text/event-stream");
            assert_eq!(h["cache-control"], "no-cache");
            assert_eq!(h["x-accel-buffering"], "no");
            assert_eq!(h["vary"], "accept-encoding");
            assert_eq!(
                h.get("content-encoding").map(|v| v.to_str().unwrap()),
                coding.map(Coding::as_str),
                "{accept}"
            );
            let mut decoder = coding.map(Decoder::new);
            let mut decoded = Vec::new();
            let mut want = Vec::new();
            for offset in 1..=3 {
                // Each event must decode before the next is sent.
                let event = sse_event(offset);
                want.extend_from_slice(&event);
                tx.send(Bytes::from(event)).unwrap();
                tokio::time::timeout(Duration::from_secs(10), async {
                    while decoded.len() < want.len() {
                        let chunk = response.chunk().await.unwrap().expect("stream open");
                        match &mut decoder {
                            Some(d) => decoded.extend(d.feed(&chunk)),
                            None => decoded.extend_from_slice(&chunk),
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("{accept}: event {offset} did not decode"));
                assert!(decoded == want, "{accept}: event {offset}");
            }
            drop(tx);
            while let Some(chunk) = response.chunk().await.unwrap() {
                if let Some(d) = &mut decoder {
                    decoded.extend(d.feed(&chunk));
                } else {
                    decoded.extend_from_slice(&chunk);
                }
            }
            assert!(decoded == want, "{accept}: the end added bytes");
            if let Some(d) = decoder {
                d.assert_finished();
            }
        }
    }
}
