//! ringcast client SDK (filled by the TCP protocol issue).
