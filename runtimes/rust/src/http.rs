//! The server side of HTTP/1.1, as much as the runtime protocol needs: a request head (request
//! line and headers), a body by `Content-Length` or chunked, keep-alive, and JSON answers.
//!
//! Everything here is bounded (head, header count, body) and refuses what it does not
//! understand with a message for a 400 answer instead of guessing.

use std::io::{self, BufRead, Read, Write};

use crate::runtime::Answer as Response;

/// Request bodies larger than this are refused.
pub(crate) const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

/// Request line plus headers, including the empty line that ends them.
const MAX_HEAD_BYTES: usize = 64 * 1024;

const MAX_HEADERS: usize = 100;

/// A chunk-size line or a trailer line.
const MAX_LINE_BYTES: usize = 8 * 1024;

/// Why a request could not be read.
#[derive(Debug)]
pub(crate) enum HttpError {
    /// The socket failed or the peer went away: there is nobody to answer.
    Io,
    /// A malformed request: answer 400 with this message, then close.
    Bad(String),
    /// A body over [`MAX_BODY_BYTES`] (`declared` by `Content-Length`, if it was): answer 400,
    /// then close.
    TooLarge { declared: Option<u64> },
}

impl From<io::Error> for HttpError {
    fn from(_: io::Error) -> Self {
        HttpError::Io
    }
}

fn bad<T>(message: impl Into<String>) -> Result<T, HttpError> {
    Err(HttpError::Bad(message.into()))
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    /// The target's path, without query (`/run`).
    pub(crate) path: String,
    /// HTTP/1.1 (else 1.0).
    pub(crate) http11: bool,
    /// Names lowercased, values without surrounding blanks, in order.
    pub(crate) headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of header `name` (lowercase).
    pub(crate) fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The comma-separated tokens of header `name`, lowercased.
    fn tokens(&self, name: &str) -> Vec<String> {
        self.values(name)
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Whether the connection stays open after the answer (HTTP/1.1 unless `Connection: close`,
    /// HTTP/1.0 only with `Connection: keep-alive`).
    pub(crate) fn keep_alive(&self) -> bool {
        let tokens = self.tokens("connection");
        if tokens.iter().any(|t| t == "close") {
            return false;
        }
        self.http11 || tokens.iter().any(|t| t == "keep-alive")
    }

    /// `Expect: 100-continue`: the client waits for a go-ahead before sending the body.
    pub(crate) fn expects_continue(&self) -> bool {
        self.http11 && self.tokens("expect").iter().any(|t| t == "100-continue")
    }
}

/// Reads one request head, up to and including its empty line. `Ok(None)`: the peer closed the
/// connection between requests. Empty lines before the request line are skipped (RFC 9112 2.2).
pub(crate) fn read_head(reader: &mut impl BufRead) -> Result<Option<Vec<u8>>, HttpError> {
    let mut head = Vec::new();
    let mut consumed = 0usize;
    loop {
        let mut line = Vec::new();
        let room = (MAX_HEAD_BYTES + 1).saturating_sub(consumed) as u64;
        let n = reader.by_ref().take(room).read_until(b'\n', &mut line)?;
        consumed += n;
        if n == 0 {
            if head.is_empty() && consumed == 0 {
                return Ok(None);
            }
            return bad("the connection closed inside the request head");
        }
        if !line.ends_with(b"\n") {
            if consumed > MAX_HEAD_BYTES {
                return bad(format!("the request head is larger than {MAX_HEAD_BYTES} bytes"));
            }
            return bad("the connection closed inside the request head");
        }
        let blank = line == b"\r\n" || line == b"\n";
        if blank && head.is_empty() {
            continue;
        }
        head.extend_from_slice(&line);
        if blank {
            return Ok(Some(head));
        }
    }
}

fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// Parses a head read by [`read_head`]; the error is the message of a 400 answer.
pub(crate) fn parse_head(raw: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "the request head is not valid UTF-8".to_owned())?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();

    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line: {:?}", shorten(request_line)));
    };
    if !is_token(method) {
        return Err(format!("malformed method: {:?}", shorten(method)));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ if version.starts_with("HTTP/") => return Err(format!("unsupported HTTP version: {}", shorten(version))),
        _ => return Err(format!("malformed request line: {:?}", shorten(request_line))),
    };
    let path = request_path(target).ok_or_else(|| format!("malformed request target: {:?}", shorten(target)))?;

    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            return Err("obsolete line folding in headers is not supported".to_owned());
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line: {:?}", shorten(line)));
        };
        if !is_token(name) {
            return Err(format!("malformed header name: {:?}", shorten(name)));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|c| c.is_ascii_control() && c != b'\t') {
            return Err(format!("control character in header {name}"));
        }
        if headers.len() == MAX_HEADERS {
            return Err(format!("more than {MAX_HEADERS} headers"));
        }
        headers.push((name.to_ascii_lowercase(), value.to_owned()));
    }
    Ok(Head {
        method: method.to_owned(),
        path,
        http11,
        headers,
    })
}

/// The path of an origin-form (`/run?x`) or absolute-form (`http://runtime/run`) target.
fn request_path(target: &str) -> Option<String> {
    let target = match target.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => {
            match rest.find('/') {
                Some(slash) => &rest[slash..],
                None => "/",
            }
        }
        _ => target,
    };
    if !target.starts_with('/') || target.bytes().any(|c| c.is_ascii_control()) {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some(path.to_owned())
}

/// A prefix of untrusted text, for messages.
fn shorten(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// How the body of a request is delimited.
enum Framing {
    None,
    Length(u64),
    Chunked,
}

fn framing(head: &Head) -> Result<Framing, HttpError> {
    let encodings = head.tokens("transfer-encoding");
    let lengths: Vec<&str> = head.values("content-length").collect();
    if !encodings.is_empty() {
        // Both at once is how requests get smuggled; one of them is lying.
        if !lengths.is_empty() {
            return bad("both Transfer-Encoding and Content-Length");
        }
        if encodings != ["chunked"] {
            return bad(format!("unsupported Transfer-Encoding: {}", encodings.join(", ")));
        }
        return Ok(Framing::Chunked);
    }
    let Some(first) = lengths.first() else {
        return Ok(Framing::None);
    };
    // Repeated Content-Length headers (or a list in one) must agree.
    let mut all = lengths.iter().flat_map(|v| v.split(',')).map(str::trim);
    let length = all.next().unwrap_or_default();
    if all.any(|v| v != length) || length.is_empty() || !length.bytes().all(|c| c.is_ascii_digit()) {
        return bad(format!("invalid Content-Length: {}", shorten(first)));
    }
    match length.parse::<u64>() {
        Ok(length) => Ok(Framing::Length(length)),
        Err(_) => Err(HttpError::TooLarge { declared: None }),
    }
}

/// Reads the request's body (empty if it has none). Sends `100 Continue` first if the client
/// asked for it and the body is acceptable.
pub(crate) fn read_body(reader: &mut impl BufRead, writer: &mut impl Write, head: &Head) -> Result<Vec<u8>, HttpError> {
    let framing = framing(head)?;
    if let Framing::Length(length) = framing
        && length > MAX_BODY_BYTES
    {
        return Err(HttpError::TooLarge { declared: Some(length) });
    }
    let has_body = !matches!(framing, Framing::None | Framing::Length(0));
    if has_body && head.expects_continue() {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
    }
    match framing {
        Framing::None => Ok(Vec::new()),
        Framing::Length(length) => {
            // Grown as data arrives: a client cannot make us allocate 64 MiB by saying so.
            let mut body = Vec::with_capacity(length.min(1 << 20) as usize);
            reader.by_ref().take(length).read_to_end(&mut body)?;
            if (body.len() as u64) < length {
                return bad("the body is shorter than its Content-Length");
            }
            Ok(body)
        }
        Framing::Chunked => read_chunked(reader),
    }
}

fn read_line(reader: &mut impl BufRead) -> Result<Vec<u8>, HttpError> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_LINE_BYTES as u64)
        .read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return bad("malformed chunked body");
    }
    Ok(line)
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?;
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or_default().trim();
        let Ok(size) = u64::from_str_radix(size, 16) else {
            return bad("malformed chunked body");
        };
        if size == 0 {
            break;
        }
        if body.len() as u64 + size > MAX_BODY_BYTES {
            return Err(HttpError::TooLarge { declared: None });
        }
        let before = body.len();
        reader.by_ref().take(size).read_to_end(&mut body)?;
        if (body.len() - before) as u64 != size || !matches!(&read_line(reader)?[..], b"\r\n" | b"\n") {
            return bad("malformed chunked body");
        }
    }
    // Trailer fields (ignored), up to the empty line.
    for _ in 0..MAX_HEADERS {
        if matches!(&read_line(reader)?[..], b"\r\n" | b"\n") {
            return Ok(body);
        }
    }
    bad("too many trailer fields")
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        422 => "Unprocessable Content",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Writes `response` in one go; `close` adds `Connection: close`, `head_only` (a HEAD request)
/// leaves the body out but keeps its length.
pub(crate) fn write_response(
    writer: &mut impl Write,
    response: &Response,
    close: bool,
    head_only: bool,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(response.body.len() + 160);
    let status = response.status;
    write!(out, "HTTP/1.1 {status} {}\r\n", reason(status))?;
    out.extend_from_slice(b"Content-Type: application/json\r\n");
    write!(out, "Content-Length: {}\r\n", response.body.len())?;
    if let Some(allow) = response.allow {
        write!(out, "Allow: {allow}\r\n")?;
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&response.body);
    }
    writer.write_all(&out)?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes()).unwrap()
    }

    fn body_of(request: &str) -> (Result<Vec<u8>, HttpError>, Vec<u8>) {
        let mut reader = Cursor::new(request.as_bytes().to_vec());
        let raw = read_head(&mut reader).unwrap().unwrap();
        let head = parse_head(&raw).unwrap();
        let mut written = Vec::new();
        (read_body(&mut reader, &mut written, &head), written)
    }

    #[test]
    fn request_line_and_headers() {
        let h = head("POST /run?x=1 HTTP/1.1\r\nHost: runtime\r\nContent-Length:  5 \r\nX-A: b\r\n\r\n");
        assert_eq!((h.method.as_str(), h.path.as_str(), h.http11), ("POST", "/run", true));
        assert_eq!(h.values("content-length").collect::<Vec<_>>(), ["5"]);
        assert_eq!(h.headers[2], ("x-a".to_owned(), "b".to_owned()));
        assert!(h.keep_alive());
        assert_eq!(head("GET http://runtime/health HTTP/1.1\n\n").path, "/health");
        assert_eq!(head("GET http://runtime HTTP/1.1\n\n").path, "/");
    }

    #[test]
    fn keep_alive_and_expect() {
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
        assert!(!head("GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n").keep_alive());
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
        assert!(head("POST / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n").expects_continue());
        assert!(!head("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expects_continue());
    }

    #[test]
    fn malformed_heads() {
        for (text, why) in [
            ("GET /\r\n\r\n", "malformed request line"),
            ("GET  / HTTP/1.1\r\n\r\n", "malformed request line"),
            ("GET / HTTP/2.0\r\n\r\n", "unsupported HTTP version"),
            ("GET / FTP\r\n\r\n", "malformed request line"),
            ("G(T / HTTP/1.1\r\n\r\n", "malformed method"),
            ("GET run HTTP/1.1\r\n\r\n", "malformed request target"),
            ("GET / HTTP/1.1\r\nNo colon\r\n\r\n", "malformed header line"),
            ("GET / HTTP/1.1\r\nBad name: x\r\n\r\n", "malformed header name"),
            ("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", "obsolete line folding"),
            ("GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", "control character"),
        ] {
            let error = parse_head(text.as_bytes()).unwrap_err();
            assert!(error.starts_with(why), "{text:?}: {error}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        let error = parse_head(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).unwrap_err();
        assert_eq!(error, "more than 100 headers");
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nA: \xff\r\n\r\n")
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    #[test]
    fn heads_are_bounded_and_may_follow_empty_lines() {
        let mut reader = Cursor::new(b"\r\n\r\nGET / HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n".to_vec());
        assert_eq!(read_head(&mut reader).unwrap().unwrap(), b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(read_head(&mut reader).unwrap().unwrap(), b"GET /x HTTP/1.1\r\n\r\n");
        assert!(read_head(&mut reader).unwrap().is_none());

        let huge = format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        let error = read_head(&mut Cursor::new(huge.into_bytes())).unwrap_err();
        assert!(matches!(error, HttpError::Bad(m) if m.contains("larger than")));
        let error = read_head(&mut Cursor::new(b"GET / HTTP/1.1\r\nA: b".to_vec())).unwrap_err();
        assert!(matches!(error, HttpError::Bad(m) if m.contains("closed inside")));
    }

    #[test]
    fn bodies_by_length() {
        let (body, written) = body_of("POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}rest");
        assert_eq!(body.unwrap(), b"{}");
        assert!(written.is_empty());
        assert!(body_of("POST / HTTP/1.1\r\n\r\n").0.unwrap().is_empty());
        let (body, _) = body_of("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(body.unwrap(), b"abc");

        for bad in ["-1", "1, 2", "x", "+3", ""] {
            let (body, _) = body_of(&format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\nabc"));
            assert!(
                matches!(body, Err(HttpError::Bad(m)) if m.starts_with("invalid Content-Length")),
                "{bad}"
            );
        }
        let (body, _) = body_of("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc");
        assert!(matches!(body, Err(HttpError::Bad(m)) if m.contains("shorter")));
        let (body, _) = body_of("POST / HTTP/1.1\r\nContent-Length: 67108865\r\n\r\n");
        assert!(matches!(
            body,
            Err(HttpError::TooLarge {
                declared: Some(67_108_865)
            })
        ));
        let (body, _) = body_of("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        assert!(matches!(body, Err(HttpError::TooLarge { declared: None })));
    }

    #[test]
    fn continue_only_for_an_acceptable_body() {
        let (body, written) = body_of("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(body.unwrap(), b"x");
        assert_eq!(written, b"HTTP/1.1 100 Continue\r\n\r\n");
        let (body, written) = body_of("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 67108865\r\n\r\n");
        assert!(matches!(body, Err(HttpError::TooLarge { .. })));
        assert!(written.is_empty());
    }

    #[test]
    fn chunked_bodies() {
        let (body, _) = body_of(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\nA\r\n0123456789\r\n0\r\nT: v\r\n\r\n",
        );
        assert_eq!(body.unwrap(), b"abc0123456789");
        for bad in ["zz\r\n", "3\r\nabcd\r\n0\r\n\r\n", "3\r\nab"] {
            let (body, _) = body_of(&format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{bad}"));
            assert!(matches!(body, Err(HttpError::Bad(_)) | Err(HttpError::Io)), "{bad:?}");
        }
        let (body, _) = body_of("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4000001\r\n");
        assert!(matches!(body, Err(HttpError::TooLarge { declared: None })));
        let (body, _) = body_of("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert!(matches!(body, Err(HttpError::Bad(m)) if m.starts_with("unsupported Transfer-Encoding")));
        let (body, _) = body_of("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert!(matches!(body, Err(HttpError::Bad(m)) if m.starts_with("both")));
    }

    #[test]
    fn responses() {
        let response = Response {
            status: 405,
            body: b"{}".to_vec(),
            allow: Some("POST"),
        };
        let mut out = Vec::new();
        write_response(&mut out, &response, true, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Allow: POST\r\nConnection: close\r\n\r\n{}"
        );
        let mut out = Vec::new();
        let response = Response {
            status: 200,
            body: b"{}".to_vec(),
            allow: None,
        };
        write_response(&mut out, &response, false, true).unwrap();
        assert!(out.ends_with(b"Content-Length: 2\r\n\r\n"));
    }
}
