//! Advertising HTTP/3 on HTTP/1.1 responses: an `Alt-Svc` header added to
//! the first final response of a connection, as its bytes stream by.
//!
//! The agent copies an upstream's bytes to the client without parsing
//! HTTP. To advertise HTTP/3 it needs no more than the head of the first
//! response: a client caches an `Alt-Svc` per origin (RFC 7838 §3.1), so
//! one per connection is enough, and nothing after that head is touched —
//! no message framing, no per-response state, no buffer kept afterwards.
//!
//! [`HeadInjector`] is fed the upstream's bytes in any split and returns
//! the bytes to send on. It holds bytes only until the first final
//! response's head is complete (at most [`MAX_HEAD`]), passes interim (1xx)
//! heads through unchanged, and gives up, passing everything through as
//! is, on anything that is not an HTTP/1.x response head, a `101`
//! (the connection stops being HTTP), a head that already has an
//! `Alt-Svc`, or a head longer than the cap.

/// The longest response head held back; a longer one goes through as is.
pub const MAX_HEAD: usize = 16 * 1024;

/// How long clients may keep using the advertised alternative (seconds).
/// An hour: a node that turns HTTP/3 off is not tried for long after, and
/// clients race TCP while an alternative fails anyway.
pub const MAX_AGE_SECS: u32 = 3600;

/// The header line advertising HTTP/3 on UDP `port`, CRLF included.
pub fn h3_header(port: u16) -> Vec<u8> {
    format!("Alt-Svc: h3=\":{port}\"; ma={MAX_AGE_SECS}\r\n").into_bytes()
}

/// What became of the first response's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still waiting for the end of a head.
    Pending,
    /// The header was added to the first final response.
    Added,
    /// The head was passed on unchanged (why is in the variant's name).
    AlreadyPresent,
    /// `101 Switching Protocols`: what follows is not HTTP/1.
    Upgraded,
    /// Not an HTTP/1.x response head.
    NotHttp,
    /// No end of head within [`MAX_HEAD`] bytes.
    TooLong,
    /// The stream ended before a head was complete.
    Ended,
}

/// Adds a header to the first final HTTP/1.x response of a byte stream.
#[derive(Debug)]
pub struct HeadInjector {
    line: Vec<u8>,
    held: Vec<u8>,
    outcome: Outcome,
}

impl HeadInjector {
    /// An injector adding `line` (a complete header line ending in CRLF).
    pub fn new(line: Vec<u8>) -> Self {
        Self { line, held: Vec::new(), outcome: Outcome::Pending }
    }

    /// What happened so far.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Whether every further byte passes through unchanged (the held
    /// buffer is released by then).
    pub fn is_done(&self) -> bool {
        self.outcome != Outcome::Pending
    }

    /// Takes the next bytes of the stream and appends what may be sent
    /// now to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.is_done() {
            out.extend_from_slice(input);
            return;
        }
        self.held.extend_from_slice(input);
        loop {
            let Some(end) = head_end(&self.held) else {
                if self.held.len() > MAX_HEAD || !could_be_status_line(&self.held) {
                    let not_http = !could_be_status_line(&self.held);
                    self.finish_with(if not_http { Outcome::NotHttp } else { Outcome::TooLong }, out);
                }
                return;
            };
            if end > MAX_HEAD {
                return self.finish_with(Outcome::TooLong, out);
            }
            let Some(status) = status_code(&self.held[..end]) else {
                return self.finish_with(Outcome::NotHttp, out);
            };
            match status {
                101 => return self.finish_with(Outcome::Upgraded, out),
                100..=199 => {
                    // Interim: on as it is; the final head follows.
                    out.extend_from_slice(&self.held[..end]);
                    self.held.drain(..end);
                }
                _ if has_header(&self.held[..end], b"alt-svc") => {
                    return self.finish_with(Outcome::AlreadyPresent, out)
                }
                _ => {
                    // Before the blank line that ends the head.
                    let blank = blank_line_len(&self.held[..end]);
                    out.extend_from_slice(&self.held[..end - blank]);
                    out.extend_from_slice(&self.line);
                    out.extend_from_slice(&self.held[end - blank..]);
                    return self.finish_with_rest(Outcome::Added);
                }
            }
        }
    }

    /// The stream ended: appends whatever is still held.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.is_done() {
            self.finish_with(Outcome::Ended, out);
        }
    }

    fn finish_with(&mut self, outcome: Outcome, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held);
        self.finish_with_rest(outcome);
    }

    fn finish_with_rest(&mut self, outcome: Outcome) {
        self.held = Vec::new();
        self.line = Vec::new();
        self.outcome = outcome;
    }
}

/// The length of the head at the start of `buf` (through its blank line,
/// CRLF or bare LF line ends alike), once it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        let line = &buf[line_start..i];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() && line_start > 0 {
            return Some(i + 1);
        }
        line_start = i + 1;
    }
    None
}

/// How many bytes the blank line at the end of `head` takes (1 or 2).
fn blank_line_len(head: &[u8]) -> usize {
    if head.ends_with(b"\r\n") {
        2
    } else {
        1
    }
}

/// Whether `buf` can still start with `HTTP/1.x NNN`.
fn could_be_status_line(buf: &[u8]) -> bool {
    const PREFIX: &[u8] = b"HTTP/1.";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return false;
    }
    // Version digit, space, three status digits.
    let rest = &buf[n..];
    let shape: [fn(u8) -> bool; 5] =
        [|b| b.is_ascii_digit(), |b| b == b' ', |b| b.is_ascii_digit(), |b| b.is_ascii_digit(), |b| b.is_ascii_digit()];
    rest.iter().zip(shape).all(|(&b, ok)| ok(b))
}

/// The status code of a complete head, if it starts with an HTTP/1.x
/// status line.
fn status_code(head: &[u8]) -> Option<u16> {
    if head.len() < 12 || !could_be_status_line(&head[..12]) {
        return None;
    }
    // After the code: a space (reason phrase) or the line's end.
    if !matches!(head.get(12), Some(b' ' | b'\r' | b'\n')) {
        return None;
    }
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Whether the head has a header named `name` (lowercase).
fn has_header(head: &[u8], name: &[u8]) -> bool {
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name) && line[name.len()] == b':'
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &[u8] = b"Alt-Svc: h3=\":443\"; ma=3600\r\n";

    /// Feeds `input` split at every point and checks each split gives
    /// the same bytes and outcome as one push.
    fn run(input: &[u8]) -> (Vec<u8>, Outcome) {
        let whole = {
            let mut inj = HeadInjector::new(LINE.to_vec());
            let mut out = Vec::new();
            inj.push(input, &mut out);
            inj.finish(&mut out);
            (out, inj.outcome())
        };
        for split in 0..=input.len() {
            let mut inj = HeadInjector::new(LINE.to_vec());
            let mut out = Vec::new();
            inj.push(&input[..split], &mut out);
            inj.push(&input[split..], &mut out);
            inj.finish(&mut out);
            assert_eq!((&out, inj.outcome()), (&whole.0, whole.1), "split at {split}");
        }
        // Byte by byte too.
        let mut inj = HeadInjector::new(LINE.to_vec());
        let mut out = Vec::new();
        for b in input {
            inj.push(std::slice::from_ref(b), &mut out);
        }
        inj.finish(&mut out);
        assert_eq!((&out, inj.outcome()), (&whole.0, whole.1), "byte by byte");
        whole
    }

    #[test]
    fn h3_header_names_the_port() {
        assert_eq!(h3_header(8443), b"Alt-Svc: h3=\":8443\"; ma=3600\r\n");
    }

    #[test]
    fn adds_to_the_first_response_only() {
        let input = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let (out, outcome) = run(input);
        assert_eq!(outcome, Outcome::Added);
        let want = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAlt-Svc: h3=\":443\"; ma=3600\r\n\r\nhiHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(out, want.to_vec());
    }

    #[test]
    fn bare_lf_heads_and_status_lines_without_a_reason_phrase() {
        let (out, outcome) = run(b"HTTP/1.0 404\nServer: x\n\nbody");
        assert_eq!(outcome, Outcome::Added);
        assert_eq!(out, b"HTTP/1.0 404\nServer: x\nAlt-Svc: h3=\":443\"; ma=3600\r\n\nbody".to_vec());
    }

    #[test]
    fn interim_responses_pass_and_the_final_one_gets_it() {
        let (out, outcome) = run(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\n\r\n",
        );
        assert_eq!(outcome, Outcome::Added);
        let want = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nAlt-Svc: h3=\":443\"; ma=3600\r\n\r\n";
        assert_eq!(out, want.to_vec());
    }

    #[test]
    fn unchanged_when_it_cannot_or_should_not_add() {
        let cases: [(&[u8], Outcome); 7] = [
            (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00", Outcome::Upgraded),
            (b"HTTP/1.1 200 OK\r\nalt-svc: clear\r\n\r\n", Outcome::AlreadyPresent),
            (b"HTTP/1.1 200 OK\r\nALT-SVC:h2=\":1\"\r\n\r\n", Outcome::AlreadyPresent),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Outcome::NotHttp),
            (b"HTTP/2.0 200 OK\r\n\r\n", Outcome::NotHttp),
            (b"HTTP/1.1 2000 OK\r\n\r\n", Outcome::NotHttp),
            (b"HTTP/1.1 200 OK\r\nServer: cut", Outcome::Ended),
        ];
        for (input, want) in cases {
            let (out, outcome) = run(input);
            assert_eq!(outcome, want, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(out, input.to_vec(), "passed through as is");
        }
    }

    #[test]
    fn a_head_over_the_cap_goes_through_as_is() {
        let mut input = b"HTTP/1.1 200 OK\r\n".to_vec();
        while input.len() <= MAX_HEAD {
            input.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        input.extend_from_slice(b"\r\n");
        let mut inj = HeadInjector::new(LINE.to_vec());
        let mut out = Vec::new();
        inj.push(&input, &mut out);
        assert_eq!(inj.outcome(), Outcome::TooLong);
        assert_eq!(out, input);
        // Streaming: released once the cap is passed, not at the end.
        let mut inj = HeadInjector::new(LINE.to_vec());
        let mut out = Vec::new();
        for chunk in input.chunks(1000) {
            inj.push(chunk, &mut out);
        }
        assert_eq!(inj.outcome(), Outcome::TooLong);
        assert_eq!(out, input);
    }

    #[test]
    fn nothing_is_held_once_done() {
        let mut inj = HeadInjector::new(LINE.to_vec());
        let mut out = Vec::new();
        inj.push(b"HTTP/1.1 204 No Content\r\n\r\n", &mut out);
        assert!(inj.is_done());
        assert_eq!(inj.held.capacity(), 0);
        out.clear();
        inj.push(b"anything", &mut out);
        assert_eq!(out, b"anything");
    }
}
