//! Fixed-newstyle negotiation: the greeting, then options until the client picks an
//! export (GO or EXPORT_NAME) or leaves.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_io::Deadline;

use crate::conn::Conn;
use crate::export::{Catalog, Export, ExportInfo, OpenError};
use crate::proto::*;
use crate::reply::ReplyMode;

/// Whether a listener offers or demands TLS.
#[derive(Clone)]
pub enum TlsPolicy {
    Off,
    /// STARTTLS is offered; plain clients are served too.
    Optional(Arc<rustls::ServerConfig>),
    /// Every option but STARTTLS and ABORT is refused until TLS is up.
    Required(Arc<rustls::ServerConfig>),
}

/// What negotiation hands to the transmission phase.
pub(crate) struct Session {
    pub conn: Conn,
    pub negotiated: Negotiated,
}

/// The export and the protocol features a client settled on.
pub(crate) struct Negotiated {
    pub name: String,
    pub export: Box<dyn Export>,
    pub mode: ReplyMode,
    pub flags: u16,
    /// The meta contexts the client selected for this export, with their ids.
    pub contexts: Vec<(u32, String)>,
}

/// How negotiation ended without a session.
#[derive(Debug)]
pub(crate) enum Ending {
    /// The client sent ABORT or hung up between options.
    Left,
    /// The client broke a rule that leaves no way to answer; the reason is logged.
    Dropped(String),
    Io(io::Error),
}

impl From<io::Error> for Ending {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Ending::Left
        } else {
            Ending::Io(e)
        }
    }
}

/// A client has this long to choose an export (qemu-nbd's default handshake limit),
/// however it spaces its bytes: clients that stay silent, or trickle, cannot hold
/// connections (each a thread, see `Server`) for longer.
pub(crate) const NEGOTIATION_LIMIT: Duration = Duration::from_secs(10);

struct Negotiation<'a> {
    conn: Conn,
    started: Instant,
    catalog: &'a dyn Catalog,
    tls: TlsPolicy,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Export the last SET_META_CONTEXT applied to, and the contexts it selected.
    meta: Option<(String, Vec<(u32, String)>)>,
}

/// A reply to an option that carries an error: its type and a message for people.
#[derive(Debug)]
struct OptError(u32, String);

impl OptError {
    fn invalid(msg: impl Into<String>) -> Self {
        OptError(REP_ERR_INVALID, msg.into())
    }

    fn from_open(e: OpenError) -> Self {
        let code = match e {
            OpenError::Unknown(_) => REP_ERR_UNKNOWN,
            OpenError::Refused(_) => REP_ERR_POLICY,
            OpenError::Unavailable(_) => REP_ERR_PLATFORM,
        };
        OptError(code, e.message().to_owned())
    }
}

/// Reads big-endian fields from an option's payload, failing on truncation.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptError> {
        if self.0.len() < n {
            return Err(OptError::invalid(
                "option data is shorter than its fields say",
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, OptError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, OptError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<&'a str, OptError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(OptError::invalid("string longer than 4096 bytes"));
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| OptError::invalid("string is not UTF-8"))
    }
    fn end(&self) -> Result<(), OptError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(OptError::invalid("option data is longer than its fields"))
        }
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Negotiates with a freshly accepted client.
pub(crate) fn negotiate(
    conn: Conn,
    catalog: &dyn Catalog,
    tls: TlsPolicy,
) -> Result<Session, Ending> {
    let mut n = Negotiation {
        conn,
        started: Instant::now(),
        catalog,
        tls,
        fixed_newstyle: false,
        no_zeroes: false,
        structured: false,
        extended: false,
        meta: None,
    };
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    n.io().write_all(&greeting)?;
    let client_flags = read_u32(&mut n.io())?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Ending::Dropped(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    n.fixed_newstyle = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    n.no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    loop {
        if let Some(session) = n.option()? {
            return Ok(session);
        }
    }
}

impl Negotiation<'_> {
    /// The stream, bounded by the negotiation's deadline.
    fn io(&mut self) -> Deadline<'_, Conn> {
        Deadline::new(
            &mut self.conn,
            self.started,
            NEGOTIATION_LIMIT,
            "negotiation",
        )
    }

    fn tls_required(&self) -> bool {
        matches!(self.tls, TlsPolicy::Required(_)) && !self.conn.is_tls()
    }

    /// Handles one option; returns the session when the client chose an export.
    fn option(&mut self) -> Result<Option<Session>, Ending> {
        let magic = read_u64(&mut self.io())?;
        if magic != IHAVEOPT {
            return Err(Ending::Dropped(format!("bad option magic {magic:#x}")));
        }
        let option = read_u32(&mut self.io())?;
        let len = read_u32(&mut self.io())?;
        if len > MAX_OPTION_LEN {
            return Err(Ending::Dropped(format!(
                "option {option} announces {len} bytes of data"
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.io().read_exact(&mut data)?;
        tracing::trace!(option, len, "NBD option");

        if self.tls_required() && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(Ending::Dropped(
                    "EXPORT_NAME before the required STARTTLS".into(),
                ));
            }
            self.reply(
                option,
                REP_ERR_TLS_REQD,
                b"this server requires TLS: send STARTTLS first",
            )?;
            return Ok(None);
        }
        let result = match option {
            OPT_EXPORT_NAME => return self.export_name(&data).map(Some),
            OPT_ABORT => {
                // The client may already have closed; a failed ACK changes nothing.
                let _ = self.reply(option, REP_ACK, &[]);
                return Err(Ending::Left);
            }
            OPT_GO => return self.info_or_go(option, &data),
            OPT_INFO => self.info_or_go(option, &data).map(|_| Ok(())),
            OPT_LIST => self.list(&data),
            OPT_STARTTLS => self.starttls(&data),
            OPT_STRUCTURED_REPLY => self.structured_reply(&data),
            OPT_EXTENDED_HEADERS => self.extended_headers(&data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data),
            _ => Ok(Err(OptError(
                REP_ERR_UNSUP,
                format!("option {option} is not supported"),
            ))),
        };
        if let Err(OptError(code, msg)) = result? {
            self.reply(option, code, msg.as_bytes())?;
        }
        Ok(None)
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut head = [0u8; 20];
        head[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        head[8..12].copy_from_slice(&option.to_be_bytes());
        head[12..16].copy_from_slice(&kind.to_be_bytes());
        head[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
        let mut msg = Vec::with_capacity(20 + data.len());
        msg.extend_from_slice(&head);
        msg.extend_from_slice(data);
        let mut io = self.io();
        io.write_all(&msg)?;
        io.flush()
    }

    fn mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }

    fn transmission_flags(&self, info: &ExportInfo) -> u16 {
        let mut flags =
            TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
        if self.mode() != ReplyMode::Simple {
            flags |= TF_SEND_DF;
        }
        if info.read_only {
            flags |= TF_READ_ONLY;
        } else {
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        flags
    }

    fn contexts_for(&self, name: &str) -> Vec<(u32, String)> {
        match &self.meta {
            Some((export, contexts)) if export == name => contexts.clone(),
            _ => Vec::new(),
        }
    }

    fn session(&mut self, name: &str, export: Box<dyn Export>, flags: u16) -> Session {
        let conn = std::mem::replace(&mut self.conn, Conn::Closed);
        Session {
            conn,
            negotiated: Negotiated {
                name: name.to_owned(),
                export,
                mode: self.mode(),
                flags,
                contexts: self.contexts_for(name),
            },
        }
    }

    fn export_name(&mut self, data: &[u8]) -> Result<Session, Ending> {
        if self.extended {
            return Err(Ending::Dropped("EXPORT_NAME after extended headers".into()));
        }
        let name = std::str::from_utf8(data)
            .map_err(|_| Ending::Dropped("export name is not UTF-8".into()))?;
        let export = self
            .catalog
            .open(name)
            .map_err(|e| Ending::Dropped(format!("EXPORT_NAME {name:?}: {}", e.message())))?;
        let info = export.info();
        let flags = self.transmission_flags(&info);
        let mut reply = Vec::with_capacity(134);
        reply.extend_from_slice(&info.size.to_be_bytes());
        reply.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        self.io().write_all(&reply)?;
        Ok(self.session(name, export, flags))
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Session>, Ending> {
        let (name, requests) = match parse_info_request(data) {
            Ok(p) => p,
            Err(OptError(code, msg)) => {
                self.reply(option, code, msg.as_bytes())?;
                return Ok(None);
            }
        };
        let opened = if option == OPT_GO {
            self.catalog.open(&name).map(|e| (e.info(), Some(e)))
        } else {
            self.catalog.describe(&name).map(|i| (i, None))
        };
        let (info, export) = match opened {
            Ok(o) => o,
            Err(e) => {
                let OptError(code, msg) = OptError::from_open(e);
                tracing::debug!(export = %name, %msg, "export not opened");
                self.reply(option, code, msg.as_bytes())?;
                return Ok(None);
            }
        };
        let flags = self.transmission_flags(&info);
        let mut export_info = INFO_EXPORT.to_be_bytes().to_vec();
        export_info.extend_from_slice(&info.size.to_be_bytes());
        export_info.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &export_info)?;
        let b = info.block_sizes;
        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [b.minimum, b.preferred, b.maximum] {
            sizes.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(option, REP_INFO, &sizes)?;
        if requests.contains(&INFO_NAME) {
            let mut r = INFO_NAME.to_be_bytes().to_vec();
            r.extend_from_slice(name.as_bytes());
            self.reply(option, REP_INFO, &r)?;
        }
        if requests.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
            let mut r = INFO_DESCRIPTION.to_be_bytes().to_vec();
            r.extend_from_slice(truncate(&info.description).as_bytes());
            self.reply(option, REP_INFO, &r)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(export.map(|e| self.session(&name, e, flags)))
    }

    fn list(&mut self, data: &[u8]) -> Result<Result<(), OptError>, Ending> {
        if !data.is_empty() {
            return Ok(Err(OptError::invalid("LIST carries no data")));
        }
        for (name, description) in self.catalog.list() {
            let mut r = (name.len() as u32).to_be_bytes().to_vec();
            r.extend_from_slice(name.as_bytes());
            r.extend_from_slice(truncate(&description).as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &r)?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])?;
        Ok(Ok(()))
    }

    fn starttls(&mut self, data: &[u8]) -> Result<Result<(), OptError>, Ending> {
        if !data.is_empty() {
            return Ok(Err(OptError::invalid("STARTTLS carries no data")));
        }
        if self.conn.is_tls() {
            return Ok(Err(OptError::invalid("TLS is already active")));
        }
        let config = match &self.tls {
            TlsPolicy::Off => {
                return Ok(Err(OptError(
                    REP_ERR_POLICY,
                    "TLS is not configured on this server".into(),
                )));
            }
            _ if !self.conn.is_tcp() => {
                return Ok(Err(OptError(
                    REP_ERR_POLICY,
                    "TLS is offered on TCP only".into(),
                )));
            }
            _ if !self.fixed_newstyle => {
                return Ok(Err(OptError(
                    REP_ERR_POLICY,
                    "TLS needs the fixed-newstyle handshake".into(),
                )));
            }
            TlsPolicy::Optional(c) | TlsPolicy::Required(c) => c.clone(),
        };
        self.reply(OPT_STARTTLS, REP_ACK, &[])?;
        // The TLS handshake's reads and writes wait at most what is left.
        self.io().arm()?;
        let conn = std::mem::replace(&mut self.conn, Conn::Closed);
        self.conn = conn
            .start_tls(config)
            .map_err(|e| Ending::Dropped(format!("TLS handshake failed: {e}")))?;
        // Nothing negotiated in clear text carries over into TLS.
        self.structured = false;
        self.extended = false;
        self.meta = None;
        Ok(Ok(()))
    }

    fn structured_reply(&mut self, data: &[u8]) -> Result<Result<(), OptError>, Ending> {
        if !data.is_empty() {
            return Ok(Err(OptError::invalid("STRUCTURED_REPLY carries no data")));
        }
        if self.extended {
            return Ok(Err(OptError(
                REP_ERR_EXT_HEADER_REQD,
                "extended headers are already in use".into(),
            )));
        }
        self.structured = true;
        self.reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])?;
        Ok(Ok(()))
    }

    fn extended_headers(&mut self, data: &[u8]) -> Result<Result<(), OptError>, Ending> {
        if !data.is_empty() {
            return Ok(Err(OptError::invalid("EXTENDED_HEADERS carries no data")));
        }
        self.extended = true;
        self.reply(OPT_EXTENDED_HEADERS, REP_ACK, &[])?;
        Ok(Ok(()))
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<Result<(), OptError>, Ending> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta = None;
        }
        if self.mode() == ReplyMode::Simple {
            return Ok(Err(OptError::invalid(
                "meta contexts need structured replies first",
            )));
        }
        let (export, queries) = match parse_meta_context_request(data) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = self.catalog.describe(&export) {
            return Ok(Err(OptError::from_open(e)));
        }
        // A query names a context, or ends in ':' for every context under it (as
        // `base:` or `qemu:dirty-bitmap:`); a LIST without queries lists all. Unknown
        // namespaces and leaves are ignored, as the protocol demands. Ids number the
        // export's contexts from 1, `base:allocation` first.
        let mut offered = vec![BASE_ALLOCATION.to_owned()];
        offered.extend(self.catalog.contexts(&export));
        let wanted = |c: &str| {
            queries
                .iter()
                .any(|q| q == c || (q.ends_with(':') && c.starts_with(q.as_str())))
        };
        let selected: Vec<(u32, String)> = (offered.into_iter().zip(1u32..))
            .filter(|(c, _)| (queries.is_empty() && !set) || wanted(c))
            .map(|(c, id)| (id, c))
            .collect();
        for (id, context) in &selected {
            let id = if set { *id } else { 0 };
            let mut r = id.to_be_bytes().to_vec();
            r.extend_from_slice(truncate(context).as_bytes());
            self.reply(option, REP_META_CONTEXT, &r)?;
        }
        if set {
            self.meta = Some((export, selected));
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(Ok(()))
    }
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's name and the
/// information requested.
fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), OptError> {
    let mut f = Fields(data);
    let name = f.string()?.to_owned();
    let count = f.u16()?;
    let requests = (0..count).map(|_| f.u16()).collect::<Result<Vec<_>, _>>()?;
    f.end()?;
    Ok((name, requests))
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the
/// export's name and the queries.
fn parse_meta_context_request(data: &[u8]) -> Result<(String, Vec<String>), OptError> {
    let mut f = Fields(data);
    let export = f.string()?.to_owned();
    let count = f.u32()?;
    // (Collected through `Result`: the count does not size anything before the
    // strings it announces are there.)
    let queries = (0..count)
        .map(|_| f.string().map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()?;
    f.end()?;
    Ok((export, queries))
}

/// The fuzz target `nbd_option` (and the replay of its corpus): the first byte picks
/// an option whose payload parser gets the rest, as a client's option would reach it.
/// Returns what was parsed, or the error reply's message; never panics.
#[doc(hidden)]
pub fn fuzz_option(data: &[u8]) -> Result<String, String> {
    let Some((&pick, payload)) = data.split_first() else {
        return Err("no option".into());
    };
    let parsed = if pick % 2 == 0 {
        parse_info_request(payload).map(|(name, requests)| format!("info {name:?} {requests:?}"))
    } else {
        parse_meta_context_request(payload)
            .map(|(export, queries)| format!("meta {export:?} {queries:?}"))
    };
    parsed.map_err(|OptError(_, message)| message)
}

/// Strings sent to clients are capped at the protocol's 4096 bytes.
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn option_payloads_parse_or_say_what_is_wrong() {
        let mut info = string("vm1");
        info.extend_from_slice(&2u16.to_be_bytes());
        info.extend_from_slice(&[0, 1, 0, 3]);
        assert_eq!(
            parse_info_request(&info).unwrap(),
            ("vm1".to_owned(), vec![INFO_NAME, INFO_BLOCK_SIZE])
        );
        let mut meta = string("vm1@s2");
        meta.extend_from_slice(&2u32.to_be_bytes());
        meta.extend(string("base:allocation"));
        meta.extend(string("qemu:dirty-bitmap:s1"));
        let (export, queries) = parse_meta_context_request(&meta).unwrap();
        assert_eq!(export, "vm1@s2");
        assert_eq!(queries, ["base:allocation", "qemu:dirty-bitmap:s1"]);
        let message = |r: Result<(String, Vec<String>), OptError>| r.unwrap_err().1;
        // A count far beyond the strings that follow: refused, nothing sized by it.
        let mut huge = string("vm1");
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend(string("base:"));
        assert!(message(parse_meta_context_request(&huge)).contains("shorter"));
        let mut trailing = string("vm1");
        trailing.extend_from_slice(&0u32.to_be_bytes());
        trailing.push(b'x');
        assert!(message(parse_meta_context_request(&trailing)).contains("longer than its fields"));
        let mut long = ((MAX_STRING + 1) as u32).to_be_bytes().to_vec();
        long.extend(vec![b'a'; MAX_STRING + 1]);
        assert!(message(parse_meta_context_request(&long)).contains("4096"));
        let bad_utf8 = [0, 0, 0, 1, 0xff, 0, 0];
        assert!(
            parse_info_request(&bad_utf8)
                .unwrap_err()
                .1
                .contains("UTF-8")
        );
    }
}
