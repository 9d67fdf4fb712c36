//! Decoding of the content codings an SSE response may come in (`gzip`,
//! `br`), only to check that every event arrived: the bench counts the
//! compressed bytes off the socket itself, so no HTTP client decompresses
//! for it. The decoders are flate2's and rust-brotli's streaming ones, fed
//! each chunk as it arrives (the broker flushes every chunk, so each decodes
//! at once).

use std::io::Write;

use anyhow::{bail, Result};

/// A content coding the bench can ask for (`Accept-Encoding`) and decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Coding {
    /// No `Accept-Encoding`: plain `text/event-stream`.
    Identity,
    /// `Accept-Encoding: gzip`.
    Gzip,
    /// `Accept-Encoding: br`.
    Br,
}

impl Coding {
    /// Its name on the command line, in `Content-Encoding` and in results.
    pub fn name(self) -> &'static str {
        match self {
            Coding::Identity => "identity",
            Coding::Gzip => "gzip",
            Coding::Br => "br",
        }
    }

    /// The coding a `Content-Encoding` value (already lower-case) names.
    pub fn from_header(value: &str) -> Result<Self> {
        Ok(match value.trim() {
            "" | "identity" => Coding::Identity,
            "gzip" | "x-gzip" => Coding::Gzip,
            "br" => Coding::Br,
            other => bail!("unknown Content-Encoding {other:?}"),
        })
    }
}

/// A decoder of one response body in one coding.
pub enum Decoder {
    /// The body is the text.
    Identity,
    /// gzip (RFC 1952).
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    /// brotli (RFC 7932).
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

impl Decoder {
    /// A decoder of a body in `coding`.
    pub fn new(coding: Coding) -> Self {
        match coding {
            Coding::Identity => Decoder::Identity,
            Coding::Gzip => Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
            Coding::Br => {
                Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096)))
            }
        }
    }

    /// Decodes `input`, appending the text it completes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<()> {
        match self {
            Decoder::Identity => out.extend_from_slice(input),
            Decoder::Gzip(d) => {
                d.write_all(input)?;
                d.flush()?;
                out.append(d.get_mut());
            }
            Decoder::Brotli(d) => {
                d.write_all(input)?;
                d.flush()?;
                out.append(d.get_mut());
            }
        }
        Ok(())
    }

    /// Whether the coded stream ended properly (gzip: with a matching
    /// CRC-32 and length). Identity has no end of its own: true.
    pub fn finished(&mut self) -> bool {
        match self {
            Decoder::Identity => true,
            Decoder::Gzip(d) => d.try_finish().is_ok(),
            Decoder::Brotli(d) => d.close().is_ok(),
        }
    }
}
