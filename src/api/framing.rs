//! Requests whose body length is ambiguous: both `Transfer-Encoding` and `Content-Length`.
//!
//! RFC 9112 (6.3) calls such a request a possible smuggling attempt: a proxy in front of us may frame
//! the body by one header and we by the other, so that what the proxy thinks is a body we read as a
//! second request. hyper processes the request by `Transfer-Encoding` and drops `Content-Length` before
//! the service sees the headers, so the check has to happen beneath hyper: [`Watch`] wraps the socket,
//! reads each request head as the bytes go by, and records one verdict per request in [`Verdicts`];
//! the service refuses a flagged request with a 400 and `Connection: close`.
//!
//! To find the next head on a keep-alive connection the reader follows each body's framing
//! (`Content-Length` bytes, or chunks up to the last one and its trailers). After an ambiguous
//! request it stops: the connection closes with the answer.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest head the scanner keeps; hyper refuses larger ones anyway (431).
const MAX_HEAD: usize = 64 * 1024;

/// One verdict per request head, in order: true when the request is ambiguous. Also says whether part
/// of a head has arrived, so that a header timeout can be told apart: a slow client (bytes of a head
/// came, not all) or an idle keep-alive connection (nothing came), which is no misbehaviour.
#[derive(Clone, Default)]
pub struct Verdicts(Arc<VerdictsInner>);

#[derive(Default)]
struct VerdictsInner {
    queue: Mutex<VecDeque<bool>>,
    mid_head: AtomicBool,
}

impl Verdicts {
    /// The verdict on the next request hyper hands to the service.
    pub fn next(&self) -> bool {
        self.0.queue.lock().expect("verdicts poisoned").pop_front().unwrap_or(false)
    }

    /// Whether the connection has sent part of a request head and not the rest.
    pub fn mid_head(&self) -> bool {
        self.0.mid_head.load(Ordering::Relaxed)
    }

    fn push(&self, ambiguous: bool) {
        self.0.queue.lock().expect("verdicts poisoned").push_back(ambiguous);
    }
}

enum State {
    /// Collecting a request head.
    Head(Vec<u8>),
    /// Skipping this many body bytes.
    Body(u64),
    /// In a chunked body: reading a chunk-size line (collected here).
    ChunkSize(Vec<u8>),
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// After the last chunk: trailer lines until an empty one (the current line collected here).
    Trailers(Vec<u8>),
    /// Stopped: an ambiguous request was seen, or the stream could not be followed.
    Done,
}

/// A stream that reports each request head's verdict as its bytes are read.
pub struct Watch<S> {
    inner: S,
    state: State,
    verdicts: Verdicts,
}

impl<S> Watch<S> {
    pub fn new(inner: S, verdicts: Verdicts) -> Watch<S> {
        Watch { inner, state: State::Head(Vec::new()), verdicts }
    }

    /// Follows the framing over `data`, recording a verdict for every complete head, and whether a
    /// head is left half-sent.
    fn scan(&mut self, data: &[u8]) {
        self.follow(data);
        let mid_head = matches!(&self.state, State::Head(buf) if !buf.is_empty());
        self.verdicts.0.mid_head.store(mid_head, Ordering::Relaxed);
    }

    fn follow(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Head(buf) => {
                    let take = data.len().min(MAX_HEAD + 4 - buf.len().min(MAX_HEAD + 4));
                    let before = buf.len();
                    buf.extend_from_slice(&data[..take]);
                    let Some(end) = find(buf, b"\r\n\r\n") else {
                        if buf.len() > MAX_HEAD {
                            self.state = State::Done;
                        }
                        data = &data[take..];
                        continue;
                    };
                    let consumed = end + 4 - before;
                    let head = std::mem::take(buf);
                    data = &data[consumed..];
                    self.state = self.after_head(&head[..end + 4]);
                }
                State::Body(n) => {
                    let skip = (*n).min(data.len() as u64) as usize;
                    *n -= skip as u64;
                    data = &data[skip..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => match data.iter().position(|b| *b == b'\n') {
                    None => {
                        line.extend_from_slice(data);
                        data = &[];
                        if line.len() > 1024 {
                            self.state = State::Done;
                        }
                    }
                    Some(i) => {
                        line.extend_from_slice(&data[..=i]);
                        data = &data[i + 1..];
                        let text = String::from_utf8_lossy(line);
                        let size = text.split(';').next().unwrap_or("").trim();
                        self.state = match u64::from_str_radix(size, 16) {
                            Ok(0) => State::Trailers(Vec::new()),
                            Ok(n) => State::ChunkData(n.saturating_add(2)),
                            Err(_) => State::Done,
                        };
                    }
                },
                State::ChunkData(n) => {
                    let skip = (*n).min(data.len() as u64) as usize;
                    *n -= skip as u64;
                    data = &data[skip..];
                    if *n == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(line) => match data.iter().position(|b| *b == b'\n') {
                    None => {
                        line.extend_from_slice(data);
                        data = &[];
                    }
                    Some(i) => {
                        line.extend_from_slice(&data[..=i]);
                        data = &data[i + 1..];
                        let empty = line.iter().all(|b| *b == b'\r' || *b == b'\n');
                        self.state = if empty { State::Head(Vec::new()) } else { State::Trailers(Vec::new()) };
                    }
                },
            }
        }
    }

    /// Records the verdict on one complete head and says how its body is framed.
    fn after_head(&self, head: &[u8]) -> State {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            // hyper will refuse it; nothing after it is read.
            self.verdicts.push(false);
            return State::Done;
        }
        let te = req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
        let cl_header = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"));
        let cl = cl_header.and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<u64>().ok());
        let ambiguous = te && cl_header.is_some();
        self.verdicts.push(ambiguous);
        if ambiguous {
            return State::Done;
        }
        match (te, cl) {
            (true, _) => State::ChunkSize(Vec::new()),
            (false, Some(0)) | (false, None) => State::Head(Vec::new()),
            (false, Some(n)) => State::Body(n),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl<S: AsyncRead + Unpin> AsyncRead for Watch<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let fresh = buf.filled()[before..].to_vec();
            self.scan(&fresh);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watch<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_of(chunks: &[&[u8]]) -> Vec<bool> {
        let v = Verdicts::default();
        let mut w = Watch::new((), v.clone());
        for c in chunks {
            w.scan(c);
        }
        let mut out = Vec::new();
        while !v.0.queue.lock().unwrap().is_empty() {
            out.push(v.next());
        }
        out
    }

    #[test]
    fn follows_keep_alive_requests_of_every_framing() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nTrailer: y\r\n\r\n\
POST /d HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts_of(&[stream]), [false, false, false, true]);
        // The same bytes one at a time.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(verdicts_of(&bytes), [false, false, false, true]);
    }

    #[test]
    fn a_half_sent_head_is_told_from_an_idle_connection() {
        let v = Verdicts::default();
        let mut w = Watch::new((), v.clone());
        assert!(!v.mid_head(), "nothing sent yet");
        w.scan(b"POST /a HTTP/1.1\r\nHost: x\r\nX-Slow: a");
        assert!(v.mid_head());
        w.scan(b"a\r\nContent-Length: 2\r\n\r\n");
        assert!(!v.mid_head(), "the head is complete; the body is not part of it");
        w.scan(b"{}");
        assert!(!v.mid_head(), "idle between requests");
        w.scan(b"G");
        assert!(v.mid_head());
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_not_one() {
        let stream: &[u8] =
            b"POST /a HTTP/1.1\r\nContent-Length: 60\r\n\r\nGET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts_of(&[stream]), [false, false]);
    }
}
