//! Gearman binary packets, worker side: encoding what a worker sends ([`ToServer`]), and
//! cutting what a job server sends ([`FromServer`]) out of a byte stream ([`Decoder`]), with
//! a size limit checked on the header before any of the body is buffered.
//!
//! This module owns the wire format and nothing else. It must never do I/O of its own (it
//! opens, polls and writes no socket: [`Decoder::read_from`] reads once from whatever
//! [`std::io::Read`] the caller hands it, so a blocking worker and a test share it) and never
//! allocate beyond the packet it is decoding: the decoder's one buffer holds at most
//! [`HEADER_LEN`] + `max_body` bytes, decoded packets borrow from it, and encoders append to
//! the caller's `Vec`. Nothing here panics on input: a malformed packet is a [`PacketError`]
//! and its connection is closed by its owner.
//!
//! # The format (gearmand 1.1.20, as shipped by Debian 12)
//!
//! A packet is a 12-byte header — magic `\0REQ` (worker or client → server) or `\0RES`
//! (server → worker or client), a big-endian `u32` type, a big-endian `u32` body size — and
//! the body: the arguments, each but the last followed by a NUL byte. The last argument runs
//! to the end of the body and may itself hold NULs (a workload, a result), so a body of `n`
//! arguments is split at its first `n - 1` NULs only. A first byte that is not NUL is
//! gearmand's line-based admin protocol (`status\n`, `workers\n`), never a binary packet.
//!
//! Verified against the gearmand sources at tag 1.1.20 (github.com/gearman/gearmand):
//! - `libgearman-1.0/protocol.h`: the type numbers (1..=42; 5 is unused) and the argument
//!   comments, e.g. `JOB_ASSIGN_ALL  J->W: HANDLE[0]FUNC[0]UNIQ[0]REDUCER[0]ARGS`.
//! - `libgearman/command.cc` (`gearmand_command_info_list`): per type, the count of
//!   NUL-terminated arguments when the type carries trailing data, else the count of all
//!   arguments, the last one unterminated; `libgearman/packet.cc` (`gearman_packet_unpack`) and
//!   `libgearman-server/plugins/protocol/gear/protocol.cc` (`unpack`) split exactly so.
//!   The `PROTOCOL` file at the repository root says the same in prose. What that gives:
//!
//! | type | # | arguments (`·` = NUL) |
//! |---|---|---|
//! | CAN_DO, CANT_DO | 1, 2 | function |
//! | RESET_ABILITIES, PRE_SLEEP, GRAB_JOB, GRAB_JOB_UNIQ, GRAB_JOB_ALL | 3, 4, 9, 30, 39 | none |
//! | NOOP, NO_JOB | 6, 10 | none |
//! | JOB_ASSIGN | 11 | handle · function · workload |
//! | JOB_ASSIGN_UNIQ | 31 | handle · function · unique · workload |
//! | JOB_ASSIGN_ALL | 40 | handle · function · unique · reducer · workload |
//! | WORK_STATUS | 12 | handle · numerator · denominator (decimal text) |
//! | WORK_COMPLETE, WORK_EXCEPTION, WORK_DATA, WORK_WARNING | 13, 25, 28, 29 | handle · data |
//! | WORK_FAIL | 14 | handle |
//! | ECHO_REQ, ECHO_RES | 16, 17 | data (the whole body) |
//! | ERROR | 19 | code · text |
//! | SET_CLIENT_ID | 22 | id |
//! | CAN_DO_TIMEOUT | 23 | function · timeout (decimal text) |
//! | OPTION_REQ, OPTION_RES | 26, 27 | option name |
//!
//! And from the server itself, `libgearman-server/server.cc` (`gearman_server_run_command`)
//! and `connection.cc`, at 1.1.20:
//! - GRAB_JOB_ALL is answered with JOB_ASSIGN_ALL only when the job has a reducer; without one
//!   the answer is JOB_ASSIGN_UNIQ. Hence one [`FromServer::JobAssign`] for all three kinds.
//! - ERROR's code is the `gearman_return_t` name less its `GEARMAN_` prefix (`JOB_NOT_FOUND`,
//!   `INVALID_COMMAND`, …); the text is not NUL-terminated.
//! - The CAN_DO_TIMEOUT timeout is in **milliseconds** (read with `strtol`, at most 20
//!   characters; 0 or less is no timeout, 1..=999 is raised to 1000; converted to a timeval
//!   since 1.1.19, commit cfa05857, gearmand issue #196 — older servers took seconds). On
//!   expiry the server puts the job back on its queue.
//! - WORK_STATUS numerator and denominator are read with `atoi` into `uint32_t` (the
//!   denominator through an 11-byte buffer), so they are `u32` here.
//! - ALL_YOURS is answered with ERROR `INVALID_COMMAND` ("Command not expected"): not sent.
//! - OPTION_REQ knows only `exceptions`; the answer is OPTION_RES with the name as sent, or
//!   ERROR `UNKNOWN_OPTION`.
//! - Job handles are at most 64 bytes with their NUL (`GEARMAN_JOB_HANDLE_SIZE`); not
//!   checked here.

use std::fmt;
use std::io::{self, Read};
use std::ops::Range;

/// Bytes of a packet header: magic, type, body size.
pub const HEADER_LEN: usize = 12;

/// The packet types a worker sends or receives (numbers from `libgearman-1.0/protocol.h`).
pub mod code {
    pub const CAN_DO: u32 = 1;
    pub const CANT_DO: u32 = 2;
    pub const RESET_ABILITIES: u32 = 3;
    pub const PRE_SLEEP: u32 = 4;
    pub const NOOP: u32 = 6;
    pub const GRAB_JOB: u32 = 9;
    pub const NO_JOB: u32 = 10;
    pub const JOB_ASSIGN: u32 = 11;
    pub const WORK_STATUS: u32 = 12;
    pub const WORK_COMPLETE: u32 = 13;
    pub const WORK_FAIL: u32 = 14;
    pub const ECHO_REQ: u32 = 16;
    pub const ECHO_RES: u32 = 17;
    pub const ERROR: u32 = 19;
    pub const SET_CLIENT_ID: u32 = 22;
    pub const CAN_DO_TIMEOUT: u32 = 23;
    pub const ALL_YOURS: u32 = 24;
    pub const WORK_EXCEPTION: u32 = 25;
    pub const OPTION_REQ: u32 = 26;
    pub const OPTION_RES: u32 = 27;
    pub const WORK_DATA: u32 = 28;
    pub const WORK_WARNING: u32 = 29;
    pub const GRAB_JOB_UNIQ: u32 = 30;
    pub const JOB_ASSIGN_UNIQ: u32 = 31;
    pub const GRAB_JOB_ALL: u32 = 39;
    pub const JOB_ASSIGN_ALL: u32 = 40;
}

/// The protocol name of a packet type, for every type gearmand 1.1.20 defines.
pub fn packet_name(code: u32) -> Option<&'static str> {
    Some(match code {
        1 => "CAN_DO",
        2 => "CANT_DO",
        3 => "RESET_ABILITIES",
        4 => "PRE_SLEEP",
        6 => "NOOP",
        7 => "SUBMIT_JOB",
        8 => "JOB_CREATED",
        9 => "GRAB_JOB",
        10 => "NO_JOB",
        11 => "JOB_ASSIGN",
        12 => "WORK_STATUS",
        13 => "WORK_COMPLETE",
        14 => "WORK_FAIL",
        15 => "GET_STATUS",
        16 => "ECHO_REQ",
        17 => "ECHO_RES",
        18 => "SUBMIT_JOB_BG",
        19 => "ERROR",
        20 => "STATUS_RES",
        21 => "SUBMIT_JOB_HIGH",
        22 => "SET_CLIENT_ID",
        23 => "CAN_DO_TIMEOUT",
        24 => "ALL_YOURS",
        25 => "WORK_EXCEPTION",
        26 => "OPTION_REQ",
        27 => "OPTION_RES",
        28 => "WORK_DATA",
        29 => "WORK_WARNING",
        30 => "GRAB_JOB_UNIQ",
        31 => "JOB_ASSIGN_UNIQ",
        32 => "SUBMIT_JOB_HIGH_BG",
        33 => "SUBMIT_JOB_LOW",
        34 => "SUBMIT_JOB_LOW_BG",
        35 => "SUBMIT_JOB_SCHED",
        36 => "SUBMIT_JOB_EPOCH",
        37 => "SUBMIT_REDUCE_JOB",
        38 => "SUBMIT_REDUCE_JOB_BACKGROUND",
        39 => "GRAB_JOB_ALL",
        40 => "JOB_ASSIGN_ALL",
        41 => "GET_STATUS_UNIQUE",
        42 => "STATUS_RES_UNIQUE",
        _ => return None,
    })
}

/// A packet type as errors show it: `JOB_ASSIGN (11)`, or `unknown type 99`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketType(pub u32);

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match packet_name(self.0) {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "unknown type {}", self.0),
        }
    }
}

/// Which way a packet goes, by its first four bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// `\0REQ`: sent to a server (by a worker or a client).
    Req,
    /// `\0RES`: sent by a server.
    Res,
}

impl Magic {
    pub const fn bytes(self) -> [u8; 4] {
        match self {
            Magic::Req => *b"\0REQ",
            Magic::Res => *b"\0RES",
        }
    }

    fn from_bytes(b: [u8; 4]) -> Option<Magic> {
        match &b {
            b"\0REQ" => Some(Magic::Req),
            b"\0RES" => Some(Magic::Res),
            _ => None,
        }
    }
}

impl fmt::Display for Magic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Magic::Req => "\\0REQ",
            Magic::Res => "\\0RES",
        })
    }
}

/// What is wrong with the bytes a peer sent (or with how the connection ended). Every case
/// but [`PacketError::Io`] means the stream can no longer be trusted: close the connection.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error(
        "got a text line (first byte {first:#04x}), not a binary packet: is this gearmand's \
         admin text protocol, or not a Gearman server at all?"
    )]
    TextLine { first: u8 },
    #[error("bad packet magic {found:02x?}: a packet starts with \\0REQ or \\0RES")]
    BadMagic { found: [u8; 4] },
    #[error("{packet} came with magic {found}, where {expected} was expected")]
    WrongMagic {
        packet: PacketType,
        found: Magic,
        expected: Magic,
    },
    #[error("{}: not a packet type gearmand defines", PacketType(*code))]
    UnknownType { code: u32 },
    #[error("{packet}: {}", unexpected_why(*magic))]
    Unexpected { packet: PacketType, magic: Magic },
    #[error("{packet} announces a {size}-byte body, over the limit of {max} bytes")]
    TooLarge {
        packet: PacketType,
        size: u32,
        max: usize,
    },
    #[error("{packet} takes no arguments but has a {len}-byte body")]
    NotEmpty { packet: PacketType, len: u32 },
    #[error(
        "{packet} needs {expected} NUL separators between its arguments, the body has {found}"
    )]
    MissingArgs {
        packet: PacketType,
        expected: usize,
        found: usize,
    },
    #[error("{packet}: the {field} is not a decimal number that fits in 32 bits")]
    BadNumber {
        packet: PacketType,
        field: &'static str,
    },
    #[error(
        "the connection closed in the middle of {}: {have} of {need} bytes had arrived",
        Partial(*packet)
    )]
    Truncated {
        /// `None` while the header itself was incomplete.
        packet: Option<PacketType>,
        have: usize,
        need: usize,
    },
    #[error("reading from the server: {0}")]
    Io(#[from] io::Error),
}

fn unexpected_why(magic: Magic) -> &'static str {
    match magic {
        Magic::Res => "not a packet a worker takes from its server",
        Magic::Req => "not a packet jobhost's worker side sends",
    }
}

/// "a packet header" or "JOB_ASSIGN (11)", for [`PacketError::Truncated`].
struct Partial(Option<PacketType>);

impl fmt::Display for Partial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(packet) => write!(f, "{packet}"),
            None => f.write_str("a packet header"),
        }
    }
}

/// One packet, not yet interpreted: its magic, its type number and its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawPacket<'a> {
    pub magic: Magic,
    pub code: u32,
    pub body: &'a [u8],
}

/// A header as read: magic checked, type and size not yet.
#[derive(Debug, Clone, Copy)]
struct Header {
    magic: Magic,
    code: u32,
    size: u32,
}

impl Header {
    fn packet(&self) -> PacketType {
        PacketType(self.code)
    }

    fn body_len(&self) -> usize {
        usize::try_from(self.size).unwrap_or(usize::MAX)
    }
}

/// The header at the front of `avail` once all of it is there; text and bad magic are
/// errors as soon as the bytes that show them are (a text line after its first byte).
fn read_header(avail: &[u8]) -> Result<Option<Header>, PacketError> {
    if let Some(&first) = avail.first() {
        if first != 0 {
            return Err(PacketError::TextLine { first });
        }
    }
    let Some(magic) = avail.get(0..4) else {
        return Ok(None);
    };
    let found = [magic[0], magic[1], magic[2], magic[3]];
    let magic = Magic::from_bytes(found).ok_or(PacketError::BadMagic { found })?;
    let Some(rest) = avail.get(4..HEADER_LEN) else {
        return Ok(None);
    };
    Ok(Some(Header {
        magic,
        code: u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
        size: u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
    }))
}

/// The first packet in `bytes` and how many bytes it takes, or `None` while it is
/// incomplete. Any magic and any type are accepted; a body over `max_body` is an error as
/// soon as the header is in. (For tests and a fake server; a worker uses [`Decoder`].)
pub fn decode_raw(
    bytes: &[u8],
    max_body: usize,
) -> Result<Option<(RawPacket<'_>, usize)>, PacketError> {
    let Some(header) = read_header(bytes)? else {
        return Ok(None);
    };
    if header.body_len() > max_body {
        return Err(too_large(&header, max_body));
    }
    let total = HEADER_LEN.saturating_add(header.body_len());
    match bytes.get(HEADER_LEN..total) {
        Some(body) => Ok(Some((
            RawPacket {
                magic: header.magic,
                code: header.code,
                body,
            },
            total,
        ))),
        None => Ok(None),
    }
}

fn too_large(header: &Header, max: usize) -> PacketError {
    PacketError::TooLarge {
        packet: header.packet(),
        size: header.size,
        max,
    }
}

/// Appends a header. Bodies are bounded by the caller's payload limit (far below 4 GiB); a
/// larger one cannot be framed at all and its size is saturated — gearmand refuses those too.
fn put_header(out: &mut Vec<u8>, magic: Magic, code: u32, body_len: usize) {
    let size = u32::try_from(body_len).unwrap_or(u32::MAX);
    out.reserve(HEADER_LEN + body_len);
    out.extend_from_slice(&magic.bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
}

/// The body size of `args` joined by NULs.
fn joined_len(args: &[&[u8]]) -> usize {
    let bytes: usize = args.iter().map(|a| a.len()).sum();
    bytes + args.len().saturating_sub(1)
}

/// Appends one packet of any magic and type: `args` joined by NUL bytes, the last one
/// unterminated — the general form, for tests and a fake server. Arguments but the last
/// must hold no NUL (the reader would split there); that is not checked.
pub fn encode_raw(magic: Magic, code: u32, args: &[&[u8]], out: &mut Vec<u8>) {
    put_header(out, magic, code, joined_len(args));
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(arg);
    }
}

/// `body` cut at its first `N - 1` NULs (`N ≥ 1`): the last piece keeps any further NULs.
fn split<const N: usize>(packet: PacketType, body: &[u8]) -> Result<[&[u8]; N], PacketError> {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut rest = body;
    for (i, slot) in out.iter_mut().enumerate() {
        if i + 1 == N {
            *slot = rest;
            break;
        }
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(PacketError::MissingArgs {
                packet,
                expected: N - 1,
                found: i,
            });
        };
        let (arg, tail) = rest.split_at(nul);
        *slot = arg;
        rest = tail.get(1..).unwrap_or_default();
    }
    Ok(out)
}

fn empty(packet: PacketType, body: &[u8]) -> Result<(), PacketError> {
    match body.len() {
        0 => Ok(()),
        len => Err(PacketError::NotEmpty {
            packet,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        }),
    }
}

/// Strict decimal: digits only, at least one, fits in a `u32` (what gearmand stores).
fn parse_u32(packet: PacketType, field: &'static str, text: &[u8]) -> Result<u32, PacketError> {
    let bad = || PacketError::BadNumber { packet, field };
    if text.is_empty() {
        return Err(bad());
    }
    text.iter().try_fold(0u32, |n, &b| {
        if !b.is_ascii_digit() {
            return Err(bad());
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u32::from(b - b'0')))
            .ok_or_else(bad)
    })
}

/// `n` in decimal, in `buf`.
fn decimal(n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// A packet a worker sends to its server (`\0REQ`). Handles and names are bytes as the
/// server gave them or as configured; those before a packet's last argument must hold no
/// NUL (a handle from [`FromServer::JobAssign`] cannot). ALL_YOURS is left out: gearmand
/// answers it with an ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToServer<'a> {
    /// This worker can run `function`.
    CanDo(&'a [u8]),
    /// Like `CanDo`, and a job of `function` not finished within `timeout_ms` milliseconds
    /// is taken back by the server (1.1.20: 0 is none, 1..=999 count as 1000; see the module
    /// doc — the unit is milliseconds, not seconds).
    CanDoTimeout { function: &'a [u8], timeout_ms: u32 },
    /// This worker can no longer run the function.
    CantDo(&'a [u8]),
    /// Forget every function this worker registered.
    ResetAbilities,
    /// About to sleep: wake this worker with NOOP when a job comes.
    PreSleep,
    /// Ask for a job: JOB_ASSIGN or NO_JOB.
    GrabJob,
    /// Ask for a job with its unique id: JOB_ASSIGN_UNIQ or NO_JOB.
    GrabJobUniq,
    /// Ask for a job with unique id and reducer: JOB_ASSIGN_ALL, JOB_ASSIGN_UNIQ (no
    /// reducer) or NO_JOB.
    GrabJobAll,
    /// Progress of a running job, sent as decimal text.
    WorkStatus {
        handle: &'a [u8],
        numerator: u32,
        denominator: u32,
    },
    /// The job finished; `data` is its result.
    WorkComplete { handle: &'a [u8], data: &'a [u8] },
    /// The job failed, without a message.
    WorkFail { handle: &'a [u8] },
    /// The job failed with an exception (clients see it only with OPTION `exceptions`).
    WorkException { handle: &'a [u8], data: &'a [u8] },
    /// Partial result data of a running job.
    WorkData { handle: &'a [u8], data: &'a [u8] },
    /// A warning from a running job.
    WorkWarning { handle: &'a [u8], data: &'a [u8] },
    /// Names this connection in the server's `workers` list.
    SetClientId(&'a [u8]),
    /// Asks the server to send the data back (ECHO_RES): a liveness check.
    EchoReq(&'a [u8]),
    /// Sets a connection option (gearmand knows only `exceptions`).
    OptionReq(&'a [u8]),
}

impl<'a> ToServer<'a> {
    /// The packet type number.
    pub fn code(&self) -> u32 {
        match self {
            ToServer::CanDo(_) => code::CAN_DO,
            ToServer::CanDoTimeout { .. } => code::CAN_DO_TIMEOUT,
            ToServer::CantDo(_) => code::CANT_DO,
            ToServer::ResetAbilities => code::RESET_ABILITIES,
            ToServer::PreSleep => code::PRE_SLEEP,
            ToServer::GrabJob => code::GRAB_JOB,
            ToServer::GrabJobUniq => code::GRAB_JOB_UNIQ,
            ToServer::GrabJobAll => code::GRAB_JOB_ALL,
            ToServer::WorkStatus { .. } => code::WORK_STATUS,
            ToServer::WorkComplete { .. } => code::WORK_COMPLETE,
            ToServer::WorkFail { .. } => code::WORK_FAIL,
            ToServer::WorkException { .. } => code::WORK_EXCEPTION,
            ToServer::WorkData { .. } => code::WORK_DATA,
            ToServer::WorkWarning { .. } => code::WORK_WARNING,
            ToServer::SetClientId(_) => code::SET_CLIENT_ID,
            ToServer::EchoReq(_) => code::ECHO_REQ,
            ToServer::OptionReq(_) => code::OPTION_REQ,
        }
    }

    /// Appends exactly one packet.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let tail = self.encode_head(out);
        out.extend_from_slice(tail);
    }

    /// Appends the packet up to its last argument and returns that argument, which the
    /// caller sends right after (`writev`), so a large result need not be copied into `out`.
    /// The header already counts it. Empty when `out` holds the whole packet.
    pub fn encode_head(&self, out: &mut Vec<u8>) -> &'a [u8] {
        let code = self.code();
        // (arguments NUL-terminated in the head, the last argument)
        let (lead, last): ([&[u8]; 1], &'a [u8]) = match *self {
            ToServer::ResetAbilities
            | ToServer::PreSleep
            | ToServer::GrabJob
            | ToServer::GrabJobUniq
            | ToServer::GrabJobAll => {
                put_header(out, Magic::Req, code, 0);
                return &[];
            }
            ToServer::CanDo(one)
            | ToServer::CantDo(one)
            | ToServer::SetClientId(one)
            | ToServer::EchoReq(one)
            | ToServer::OptionReq(one) => {
                put_header(out, Magic::Req, code, one.len());
                return one;
            }
            ToServer::WorkFail { handle } => {
                put_header(out, Magic::Req, code, handle.len());
                return handle;
            }
            ToServer::CanDoTimeout {
                function,
                timeout_ms,
            } => {
                let mut buf = [0u8; 10];
                encode_raw(
                    Magic::Req,
                    code,
                    &[function, decimal(timeout_ms, &mut buf)],
                    out,
                );
                return &[];
            }
            ToServer::WorkStatus {
                handle,
                numerator,
                denominator,
            } => {
                let (mut n, mut d) = ([0u8; 10], [0u8; 10]);
                let args = [
                    handle,
                    decimal(numerator, &mut n),
                    decimal(denominator, &mut d),
                ];
                encode_raw(Magic::Req, code, &args, out);
                return &[];
            }
            ToServer::WorkComplete { handle, data }
            | ToServer::WorkException { handle, data }
            | ToServer::WorkData { handle, data }
            | ToServer::WorkWarning { handle, data } => ([handle], data),
        };
        put_header(out, Magic::Req, code, joined_len(&lead) + 1 + last.len());
        for arg in lead {
            out.extend_from_slice(arg);
            out.push(0);
        }
        last
    }
}

/// Interprets a worker's packet (type and body of a `\0REQ` packet), as a fake server does,
/// and as tests check what [`ToServer::encode`] wrote.
pub fn parse_to_server(code: u32, body: &[u8]) -> Result<ToServer<'_>, PacketError> {
    let packet = PacketType(code);
    let none = |p: ToServer<'static>| empty(packet, body).map(|()| p);
    Ok(match code {
        code::CAN_DO => ToServer::CanDo(body),
        code::CANT_DO => ToServer::CantDo(body),
        code::SET_CLIENT_ID => ToServer::SetClientId(body),
        code::ECHO_REQ => ToServer::EchoReq(body),
        code::OPTION_REQ => ToServer::OptionReq(body),
        code::WORK_FAIL => ToServer::WorkFail { handle: body },
        code::RESET_ABILITIES => none(ToServer::ResetAbilities)?,
        code::PRE_SLEEP => none(ToServer::PreSleep)?,
        code::GRAB_JOB => none(ToServer::GrabJob)?,
        code::GRAB_JOB_UNIQ => none(ToServer::GrabJobUniq)?,
        code::GRAB_JOB_ALL => none(ToServer::GrabJobAll)?,
        code::CAN_DO_TIMEOUT => {
            let [function, timeout] = split(packet, body)?;
            ToServer::CanDoTimeout {
                function,
                timeout_ms: parse_u32(packet, "timeout", timeout)?,
            }
        }
        code::WORK_STATUS => {
            let [handle, numerator, denominator] = split(packet, body)?;
            ToServer::WorkStatus {
                handle,
                numerator: parse_u32(packet, "numerator", numerator)?,
                denominator: parse_u32(packet, "denominator", denominator)?,
            }
        }
        code::WORK_COMPLETE | code::WORK_EXCEPTION | code::WORK_DATA | code::WORK_WARNING => {
            let [handle, data] = split(packet, body)?;
            match code {
                code::WORK_COMPLETE => ToServer::WorkComplete { handle, data },
                code::WORK_EXCEPTION => ToServer::WorkException { handle, data },
                code::WORK_DATA => ToServer::WorkData { handle, data },
                _ => ToServer::WorkWarning { handle, data },
            }
        }
        other if packet_name(other).is_some() => {
            return Err(PacketError::Unexpected {
                packet,
                magic: Magic::Req,
            })
        }
        other => return Err(PacketError::UnknownType { code: other }),
    })
}

/// A packet a job server sends to a worker (`\0RES`), borrowing from the decoder's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromServer<'a> {
    /// Wake up: a job may be waiting (sent after PRE_SLEEP).
    Noop,
    /// The answer to a GRAB_JOB*: nothing to do.
    NoJob,
    /// A job: JOB_ASSIGN (`unique` and `reducer` `None`), JOB_ASSIGN_UNIQ (`reducer`
    /// `None`) or JOB_ASSIGN_ALL (both `Some`).
    JobAssign {
        handle: &'a [u8],
        function: &'a [u8],
        unique: Option<&'a [u8]>,
        reducer: Option<&'a [u8]>,
        workload: &'a [u8],
    },
    /// The data of an ECHO_REQ, back.
    EchoRes(&'a [u8]),
    /// The server refused something: `code` is a name such as `JOB_NOT_FOUND`.
    Error { code: &'a [u8], text: &'a [u8] },
    /// An OPTION_REQ was accepted: the option's name.
    OptionRes(&'a [u8]),
}

impl FromServer<'_> {
    /// The packet type number.
    pub fn code(&self) -> u32 {
        match self {
            FromServer::Noop => code::NOOP,
            FromServer::NoJob => code::NO_JOB,
            FromServer::JobAssign {
                unique: None,
                reducer: None,
                ..
            } => code::JOB_ASSIGN,
            FromServer::JobAssign { reducer: None, .. } => code::JOB_ASSIGN_UNIQ,
            FromServer::JobAssign { .. } => code::JOB_ASSIGN_ALL,
            FromServer::EchoRes(_) => code::ECHO_RES,
            FromServer::Error { .. } => code::ERROR,
            FromServer::OptionRes(_) => code::OPTION_RES,
        }
    }
}

/// What the header alone says of a server packet: its type is one a worker takes, and a
/// type without arguments has an empty body. Checked before the body is buffered.
fn check_from_server(header: &Header) -> Result<(), PacketError> {
    let packet = header.packet();
    match header.code {
        code::NOOP | code::NO_JOB if header.size != 0 => Err(PacketError::NotEmpty {
            packet,
            len: header.size,
        }),
        code::NOOP
        | code::NO_JOB
        | code::JOB_ASSIGN
        | code::JOB_ASSIGN_UNIQ
        | code::JOB_ASSIGN_ALL
        | code::ECHO_RES
        | code::ERROR
        | code::OPTION_RES => Ok(()),
        other if packet_name(other).is_some() => Err(PacketError::Unexpected {
            packet,
            magic: Magic::Res,
        }),
        other => Err(PacketError::UnknownType { code: other }),
    }
}

/// Interprets a server's packet (type and body of a `\0RES` packet). Types a worker does not
/// take — a client's packets, or the WORK_* a server forwards to clients — are errors.
pub fn parse_from_server(code: u32, body: &[u8]) -> Result<FromServer<'_>, PacketError> {
    let packet = PacketType(code);
    check_from_server(&Header {
        magic: Magic::Res,
        code,
        size: u32::try_from(body.len()).unwrap_or(u32::MAX),
    })?;
    Ok(match code {
        code::NOOP => FromServer::Noop,
        code::NO_JOB => FromServer::NoJob,
        code::JOB_ASSIGN => {
            let [handle, function, workload] = split(packet, body)?;
            FromServer::JobAssign {
                handle,
                function,
                unique: None,
                reducer: None,
                workload,
            }
        }
        code::JOB_ASSIGN_UNIQ => {
            let [handle, function, unique, workload] = split(packet, body)?;
            FromServer::JobAssign {
                handle,
                function,
                unique: Some(unique),
                reducer: None,
                workload,
            }
        }
        code::JOB_ASSIGN_ALL => {
            let [handle, function, unique, reducer, workload] = split(packet, body)?;
            FromServer::JobAssign {
                handle,
                function,
                unique: Some(unique),
                reducer: Some(reducer),
                workload,
            }
        }
        code::ECHO_RES => FromServer::EchoRes(body),
        code::ERROR => {
            let [code, text] = split(packet, body)?;
            FromServer::Error { code, text }
        }
        code::OPTION_RES => FromServer::OptionRes(body),
        // check_from_server let nothing else through; this keeps the match total.
        other => return Err(PacketError::UnknownType { code: other }),
    })
}

/// What one [`Decoder::read_from`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// `n` bytes arrived (0 only when the buffer was full: call [`Decoder::next`] first).
    Read(usize),
    /// A non-blocking source has nothing now.
    WouldBlock,
    /// The peer closed the connection between packets.
    Closed,
}

/// What [`Decoder::read_from`] asks one read for, at least (when there is room).
const READ_CHUNK: usize = 64 << 10;

/// A server's byte stream cut into packets: bytes go in with [`Decoder::read_from`] (straight
/// from the socket into the buffer) or [`Decoder::feed`]; packets come out of
/// [`Decoder::next`], borrowing from the buffer, so a workload is never copied.
///
/// At most [`HEADER_LEN`] + `max_body` bytes are ever buffered: a header announcing a larger
/// body is an error before any of the body is read. Consumed bytes are moved out lazily, when
/// room is needed. An error leaves the bad packet at the front, so every later call returns
/// it again: close the connection.
#[derive(Debug)]
pub struct Decoder {
    /// `buf[start..end]` is unread; `buf[end..]` is initialised room for the next read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_body: usize,
}

impl Decoder {
    /// `max_body`: the largest body accepted (a workload plus its handle, function and
    /// unique id).
    pub fn new(max_body: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_body,
        }
    }

    /// Bytes received and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The most bytes ever buffered: one whole packet of the largest size.
    pub fn limit(&self) -> usize {
        HEADER_LEN.saturating_add(self.max_body)
    }

    fn room(&self) -> usize {
        self.limit().saturating_sub(self.buffered())
    }

    /// Takes as many of `bytes` as fit under [`Decoder::limit`] and returns how many: call
    /// [`Decoder::next`] until `Ok(None)`, then feed the rest.
    #[must_use = "bytes past the limit are not taken"]
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        self.make_room(n);
        let (Some(to), Some(from)) = (self.buf.get_mut(self.end..self.end + n), bytes.get(..n))
        else {
            return 0; // unreachable: make_room made the room, and n ≤ bytes.len()
        };
        to.copy_from_slice(from);
        self.end += n;
        n
    }

    /// Reads once from `source` into the buffer, retrying on EINTR. Call [`Decoder::next`]
    /// until `Ok(None)` first. End of file with nothing buffered is [`Fill::Closed`]; with
    /// part of a packet buffered it is [`PacketError::Truncated`].
    ///
    /// Asks for the rest of the packet being received when its header is in — bounded by
    /// what has arrived so far, so a server that announces a large body and sends nothing
    /// costs no more than twice what it sent — and at least 64 KiB, never past the limit.
    pub fn read_from(&mut self, source: &mut impl Read) -> Result<Fill, PacketError> {
        let room = self.room();
        if room == 0 {
            return Ok(Fill::Read(0));
        }
        let want = self
            .missing()
            .clamp(READ_CHUNK, READ_CHUNK.max(self.buffered()))
            .min(room);
        self.make_room(want);
        loop {
            let Some(into) = self.buf.get_mut(self.end..self.end + want) else {
                return Ok(Fill::Read(0)); // unreachable: make_room made the room
            };
            match source.read(into) {
                Ok(0) => return self.closed(),
                Ok(n) => {
                    // (A reader claiming more than it was given is believed only as far.)
                    let n = n.min(want);
                    self.end += n;
                    return Ok(Fill::Read(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
                Err(e) => return Err(PacketError::Io(e)),
            }
        }
    }

    /// End of file: clean between packets, else a truncated packet.
    fn closed(&self) -> Result<Fill, PacketError> {
        let have = self.buffered();
        if have == 0 {
            return Ok(Fill::Closed);
        }
        let avail = self.unread();
        let header = read_header(avail)?;
        Err(PacketError::Truncated {
            packet: header.map(|h| h.packet()),
            have,
            need: header.map_or(HEADER_LEN, |h| HEADER_LEN.saturating_add(h.body_len())),
        })
    }

    fn unread(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }

    /// Bytes still missing of the packet at the front when its header is in (else 0), up to
    /// the limit. Only a hint for sizing reads.
    fn missing(&self) -> usize {
        match read_header(self.unread()) {
            Ok(Some(h)) => HEADER_LEN
                .saturating_add(h.body_len().min(self.max_body))
                .saturating_sub(self.buffered()),
            _ => 0,
        }
    }

    /// Makes `want` bytes of initialised room after the unread ones, moving them to the front
    /// or growing the buffer. Callers keep `buffered + want` within the limit, so the buffer
    /// never outgrows it.
    fn make_room(&mut self, want: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
    }

    /// Gives the buffer's memory back when nothing is buffered (after a large job, before a
    /// long wait).
    pub fn shrink(&mut self) {
        // The ordinary buffer (one read's worth) stays: freeing it after every job would have
        // the next read allocate and zero it again.
        if self.start == self.end && self.buf.len() > 2 * READ_CHUNK {
            *self = Decoder::new(self.max_body);
        }
    }

    /// The front packet's header and body range once it is whole, checked against `expect`
    /// and `check` from its header alone. Nothing is consumed.
    fn front(
        &self,
        expect: Magic,
        check: fn(&Header) -> Result<(), PacketError>,
    ) -> Result<Option<(Header, Range<usize>)>, PacketError> {
        let avail = self.unread();
        let Some(header) = read_header(avail)? else {
            return Ok(None);
        };
        if header.magic != expect {
            return Err(PacketError::WrongMagic {
                packet: header.packet(),
                found: header.magic,
                expected: expect,
            });
        }
        check(&header)?;
        if header.body_len() > self.max_body {
            return Err(too_large(&header, self.max_body));
        }
        let total = HEADER_LEN + header.body_len();
        if avail.len() < total {
            return Ok(None);
        }
        Ok(Some((header, self.start + HEADER_LEN..self.start + total)))
    }

    /// The next whole packet from a server, or `None` until more bytes arrive. A `\0REQ`
    /// packet, a type a worker does not take, or a body over the limit is an error as soon as
    /// its header is in.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<FromServer<'_>>, PacketError> {
        let Some((header, body)) = self.front(Magic::Res, check_from_server)? else {
            return Ok(None);
        };
        let end = body.end;
        let buf = &self.buf;
        let packet = parse_from_server(header.code, buf.get(body).unwrap_or_default())?;
        self.start = end;
        Ok(Some(packet))
    }

    /// The next whole packet of magic `expect`, any type, uninterpreted (for a fake server,
    /// which reads `\0REQ` packets and hands them to [`parse_to_server`]).
    pub fn next_raw(&mut self, expect: Magic) -> Result<Option<RawPacket<'_>>, PacketError> {
        let Some((header, body)) = self.front(expect, |_| Ok(()))? else {
            return Ok(None);
        };
        self.start = body.end;
        Ok(Some(RawPacket {
            magic: header.magic,
            code: header.code,
            body: self.buf.get(body).unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    // ---- helpers ----

    /// An owned [`FromServer`], to collect packets across `next` calls and to build server
    /// packets with [`encode_raw`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Srv {
        Noop,
        NoJob,
        Assign {
            handle: Vec<u8>,
            function: Vec<u8>,
            unique: Option<Vec<u8>>,
            reducer: Option<Vec<u8>>,
            workload: Vec<u8>,
        },
        Echo(Vec<u8>),
        Error {
            code: Vec<u8>,
            text: Vec<u8>,
        },
        OptionRes(Vec<u8>),
    }

    impl Srv {
        fn of(p: &FromServer<'_>) -> Srv {
            match *p {
                FromServer::Noop => Srv::Noop,
                FromServer::NoJob => Srv::NoJob,
                FromServer::JobAssign {
                    handle,
                    function,
                    unique,
                    reducer,
                    workload,
                } => Srv::Assign {
                    handle: handle.to_vec(),
                    function: function.to_vec(),
                    unique: unique.map(<[u8]>::to_vec),
                    reducer: reducer.map(<[u8]>::to_vec),
                    workload: workload.to_vec(),
                },
                FromServer::EchoRes(d) => Srv::Echo(d.to_vec()),
                FromServer::Error { code, text } => Srv::Error {
                    code: code.to_vec(),
                    text: text.to_vec(),
                },
                FromServer::OptionRes(n) => Srv::OptionRes(n.to_vec()),
            }
        }

        /// The packet, built the general way (as a fake server would).
        fn encode(&self, out: &mut Vec<u8>) {
            let res = Magic::Res;
            match self {
                Srv::Noop => encode_raw(res, code::NOOP, &[], out),
                Srv::NoJob => encode_raw(res, code::NO_JOB, &[], out),
                Srv::Assign {
                    handle,
                    function,
                    unique: None,
                    workload,
                    ..
                } => encode_raw(res, code::JOB_ASSIGN, &[handle, function, workload], out),
                Srv::Assign {
                    handle,
                    function,
                    unique: Some(unique),
                    reducer: None,
                    workload,
                } => encode_raw(
                    res,
                    code::JOB_ASSIGN_UNIQ,
                    &[handle, function, unique, workload],
                    out,
                ),
                Srv::Assign {
                    handle,
                    function,
                    unique: Some(unique),
                    reducer: Some(reducer),
                    workload,
                } => encode_raw(
                    res,
                    code::JOB_ASSIGN_ALL,
                    &[handle, function, unique, reducer, workload],
                    out,
                ),
                Srv::Echo(d) => encode_raw(res, code::ECHO_RES, &[d], out),
                Srv::Error { code, text } => encode_raw(res, code::ERROR, &[code, text], out),
                Srv::OptionRes(n) => encode_raw(res, code::OPTION_RES, &[n], out),
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut v = Vec::new();
            self.encode(&mut v);
            v
        }
    }

    fn enc(p: ToServer<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        p.encode(&mut v);
        v
    }

    /// Feeds `bytes` whole and returns the first packet (or the error).
    fn first(bytes: &[u8], max_body: usize) -> Result<Option<Srv>, PacketError> {
        let mut d = Decoder::new(max_body);
        assert_eq!(d.feed(bytes), bytes.len().min(d.limit()));
        d.next().map(|p| p.as_ref().map(Srv::of))
    }

    fn first_err(bytes: &[u8]) -> PacketError {
        match first(bytes, 1024) {
            Err(e) => e,
            Ok(p) => panic!("expected an error, got {p:?}"),
        }
    }

    /// A reader that plays a script of reads; Ok(0) once it is over.
    struct Script(VecDeque<io::Result<Vec<u8>>>);

    impl Script {
        fn new(steps: Vec<io::Result<Vec<u8>>>) -> Script {
            Script(steps.into())
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(Err(e)) => Err(e),
                Some(Ok(mut chunk)) => {
                    let n = chunk.len().min(buf.len());
                    buf[..n].copy_from_slice(&chunk[..n]);
                    if n < chunk.len() {
                        self.0.push_front(Ok(chunk.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    // ---- ToServer: exact bytes, and back ----

    /// The exact encoding, that `encode_head` + its tail make the same bytes, and that the
    /// packet parses back to itself.
    fn check_to_server(p: ToServer<'_>, expected: &[u8]) {
        let bytes = enc(p);
        assert_eq!(bytes, expected, "{p:?}");
        let mut head = Vec::new();
        let tail = p.encode_head(&mut head);
        head.extend_from_slice(tail);
        assert_eq!(head, expected, "encode_head of {p:?}");
        let (raw, used) = decode_raw(&bytes, 1024).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(raw.magic, Magic::Req);
        assert_eq!(raw.code, p.code());
        assert_eq!(parse_to_server(raw.code, raw.body).unwrap(), p);
    }

    #[test]
    fn can_do() {
        check_to_server(ToServer::CanDo(b"noop"), b"\0REQ\0\0\0\x01\0\0\0\x04noop");
        // PROTOCOL's example: registering "reverse".
        check_to_server(
            ToServer::CanDo(b"reverse"),
            b"\x00\x52\x45\x51\x00\x00\x00\x01\x00\x00\x00\x07reverse",
        );
    }

    #[test]
    fn can_do_timeout() {
        check_to_server(
            ToServer::CanDoTimeout {
                function: b"rev",
                timeout_ms: 30000,
            },
            b"\0REQ\0\0\0\x17\0\0\0\x09rev\x0030000",
        );
        check_to_server(
            ToServer::CanDoTimeout {
                function: b"f",
                timeout_ms: u32::MAX,
            },
            b"\0REQ\0\0\0\x17\0\0\0\x0cf\x004294967295",
        );
        check_to_server(
            ToServer::CanDoTimeout {
                function: b"f",
                timeout_ms: 0,
            },
            b"\0REQ\0\0\0\x17\0\0\0\x03f\x000",
        );
    }

    #[test]
    fn cant_do() {
        check_to_server(ToServer::CantDo(b"noop"), b"\0REQ\0\0\0\x02\0\0\0\x04noop");
    }

    #[test]
    fn packets_without_arguments() {
        check_to_server(ToServer::ResetAbilities, b"\0REQ\0\0\0\x03\0\0\0\0");
        check_to_server(ToServer::PreSleep, b"\0REQ\0\0\0\x04\0\0\0\0");
        // PROTOCOL's example: 00 52 45 51 | 00 00 00 09 | 00 00 00 00.
        check_to_server(
            ToServer::GrabJob,
            b"\x00REQ\x00\x00\x00\x09\x00\x00\x00\x00",
        );
        check_to_server(ToServer::GrabJobUniq, b"\0REQ\0\0\0\x1e\0\0\0\0");
        check_to_server(ToServer::GrabJobAll, b"\0REQ\0\0\0\x27\0\0\0\0");
    }

    #[test]
    fn work_status() {
        check_to_server(
            ToServer::WorkStatus {
                handle: b"H:lap:1",
                numerator: 50,
                denominator: 100,
            },
            b"\0REQ\0\0\0\x0c\0\0\0\x0eH:lap:1\x0050\x00100",
        );
        check_to_server(
            ToServer::WorkStatus {
                handle: b"H:1",
                numerator: 0,
                denominator: u32::MAX,
            },
            b"\0REQ\0\0\0\x0c\0\0\0\x10H:1\x000\x004294967295",
        );
    }

    #[test]
    fn work_complete() {
        // PROTOCOL's example, byte for byte.
        check_to_server(
            ToServer::WorkComplete {
                handle: b"H:lap:1",
                data: b"tset",
            },
            b"\x00REQ\x00\x00\x00\x0d\x00\x00\x00\x0cH:lap:1\x00tset",
        );
        // A result with NULs, and an empty one.
        check_to_server(
            ToServer::WorkComplete {
                handle: b"H:1",
                data: b"a\0\0b",
            },
            b"\0REQ\0\0\0\x0d\0\0\0\x08H:1\0a\0\0b",
        );
        check_to_server(
            ToServer::WorkComplete {
                handle: b"H:1",
                data: b"",
            },
            b"\0REQ\0\0\0\x0d\0\0\0\x04H:1\0",
        );
    }

    #[test]
    fn work_fail() {
        check_to_server(
            ToServer::WorkFail { handle: b"H:lap:1" },
            b"\0REQ\0\0\0\x0e\0\0\0\x07H:lap:1",
        );
    }

    #[test]
    fn work_exception_data_warning() {
        check_to_server(
            ToServer::WorkException {
                handle: b"H:1",
                data: b"boom",
            },
            b"\0REQ\0\0\0\x19\0\0\0\x08H:1\0boom",
        );
        check_to_server(
            ToServer::WorkData {
                handle: b"H:1",
                data: b"a\0b",
            },
            b"\0REQ\0\0\0\x1c\0\0\0\x07H:1\0a\0b",
        );
        check_to_server(
            ToServer::WorkWarning {
                handle: b"H:1",
                data: b"w",
            },
            b"\0REQ\0\0\0\x1d\0\0\0\x05H:1\0w",
        );
    }

    #[test]
    fn set_client_id_echo_option() {
        check_to_server(ToServer::SetClientId(b"w1"), b"\0REQ\0\0\0\x16\0\0\0\x02w1");
        check_to_server(
            ToServer::EchoReq(b"ping\0x"),
            b"\0REQ\0\0\0\x10\0\0\0\x06ping\0x",
        );
        check_to_server(
            ToServer::OptionReq(b"exceptions"),
            b"\0REQ\0\0\0\x1a\0\0\0\x0aexceptions",
        );
    }

    #[test]
    fn encode_head_leaves_the_data_to_the_caller() {
        let data = vec![7u8; 1000];
        let p = ToServer::WorkComplete {
            handle: b"H:1",
            data: &data,
        };
        let mut head = Vec::new();
        let tail = p.encode_head(&mut head);
        assert_eq!(head, b"\0REQ\0\0\0\x0d\0\0\x03\xecH:1\0"); // 4 + 1000 = 0x3ec
        assert_eq!(tail.as_ptr(), data.as_ptr());
        assert_eq!(tail.len(), 1000);
    }

    #[test]
    fn encode_appends() {
        let mut out = b"xy".to_vec();
        ToServer::GrabJob.encode(&mut out);
        ToServer::PreSleep.encode(&mut out);
        assert_eq!(out, b"xy\0REQ\0\0\0\x09\0\0\0\0\0REQ\0\0\0\x04\0\0\0\0");
    }

    // ---- FromServer: hand-written server bytes, and back ----

    /// Decodes `bytes` as one server packet, checks it, and that `encode_raw` of the same
    /// fields gives the same bytes.
    fn check_from_server(bytes: &[u8], expected: FromServer<'_>) {
        let mut d = Decoder::new(1024);
        assert_eq!(d.feed(bytes), bytes.len());
        let p = d.next().unwrap().unwrap();
        assert_eq!(p, expected);
        assert_eq!(
            u32::from_be_bytes(bytes[4..8].try_into().unwrap()),
            p.code()
        );
        let own = Srv::of(&p);
        assert_eq!(own.bytes(), bytes);
        assert!(d.next().unwrap().is_none());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn noop_and_no_job() {
        // PROTOCOL's examples.
        check_from_server(b"\x00RES\x00\x00\x00\x06\x00\x00\x00\x00", FromServer::Noop);
        check_from_server(
            b"\x00RES\x00\x00\x00\x0a\x00\x00\x00\x00",
            FromServer::NoJob,
        );
    }

    #[test]
    fn job_assign() {
        // PROTOCOL's example: size 0x14 = 20.
        check_from_server(
            b"\x00RES\x00\x00\x00\x0b\x00\x00\x00\x14H:lap:1\x00reverse\x00test",
            FromServer::JobAssign {
                handle: b"H:lap:1",
                function: b"reverse",
                unique: None,
                reducer: None,
                workload: b"test",
            },
        );
        // The workload keeps its NULs; an empty workload is fine.
        check_from_server(
            b"\0RES\0\0\0\x0b\0\0\0\x08H:1\0f\0\0\0",
            FromServer::JobAssign {
                handle: b"H:1",
                function: b"f",
                unique: None,
                reducer: None,
                workload: b"\0\0",
            },
        );
        check_from_server(
            b"\0RES\0\0\0\x0b\0\0\0\x06H:1\0f\0",
            FromServer::JobAssign {
                handle: b"H:1",
                function: b"f",
                unique: None,
                reducer: None,
                workload: b"",
            },
        );
    }

    #[test]
    fn job_assign_uniq() {
        // 7 + 1 + 7 + 1 + 2 + 1 + 5 = 24 = 0x18.
        check_from_server(
            b"\0RES\0\0\0\x1f\0\0\0\x18H:lap:1\0reverse\0u1\0te\0st",
            FromServer::JobAssign {
                handle: b"H:lap:1",
                function: b"reverse",
                unique: Some(b"u1"),
                reducer: None,
                workload: b"te\0st",
            },
        );
    }

    #[test]
    fn job_assign_all() {
        // 3 + 1 + 3 + 1 + 1 + 1 + 3 + 1 + 4 = 18 = 0x12.
        check_from_server(
            b"\0RES\0\0\0\x28\0\0\0\x12H:1\0sum\0u\0red\0data",
            FromServer::JobAssign {
                handle: b"H:1",
                function: b"sum",
                unique: Some(b"u"),
                reducer: Some(b"red"),
                workload: b"data",
            },
        );
    }

    #[test]
    fn echo_res() {
        check_from_server(
            b"\0RES\0\0\0\x11\0\0\0\x06ping\0x",
            FromServer::EchoRes(b"ping\0x"),
        );
        check_from_server(b"\0RES\0\0\0\x11\0\0\0\0", FromServer::EchoRes(b""));
    }

    #[test]
    fn error() {
        // What gearmand sends for ALL_YOURS: 15 + 1 + 20 = 36 = 0x24.
        check_from_server(
            b"\0RES\0\0\0\x13\0\0\0\x24INVALID_COMMAND\0Command not expected",
            FromServer::Error {
                code: b"INVALID_COMMAND",
                text: b"Command not expected",
            },
        );
    }

    #[test]
    fn option_res() {
        check_from_server(
            b"\0RES\0\0\0\x1b\0\0\0\x0aexceptions",
            FromServer::OptionRes(b"exceptions"),
        );
    }

    #[test]
    fn a_worker_conversation_in_one_read() {
        let mut stream = Vec::new();
        for p in [
            Srv::NoJob,
            Srv::Noop,
            Srv::Assign {
                handle: b"H:1".to_vec(),
                function: b"f".to_vec(),
                unique: None,
                reducer: None,
                workload: b"w".to_vec(),
            },
        ] {
            p.encode(&mut stream);
        }
        let mut d = Decoder::new(64);
        let mut src = Script::new(vec![Ok(stream)]);
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Read(43)));
        assert_eq!(d.next().unwrap(), Some(FromServer::NoJob));
        assert_eq!(d.next().unwrap(), Some(FromServer::Noop));
        assert!(matches!(
            d.next().unwrap(),
            Some(FromServer::JobAssign { workload: b"w", .. })
        ));
        assert_eq!(d.next().unwrap(), None);
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Closed));
    }

    #[test]
    fn a_packet_split_anywhere() {
        let bytes = b"\0RES\0\0\0\x0b\0\0\0\x14H:lap:1\0reverse\0test";
        for cut in 0..=bytes.len() {
            let mut d = Decoder::new(1024);
            assert_eq!(d.feed(&bytes[..cut]), cut);
            if cut < bytes.len() {
                assert_eq!(d.next().unwrap(), None, "cut at {cut}");
            }
            assert_eq!(d.feed(&bytes[cut..]), bytes.len() - cut);
            assert!(matches!(
                d.next().unwrap(),
                Some(FromServer::JobAssign {
                    workload: b"test",
                    ..
                })
            ));
        }
    }

    // ---- malformed input ----

    #[test]
    fn text_is_refused_at_its_first_byte() {
        let e = first_err(b"status\n");
        assert!(matches!(e, PacketError::TextLine { first: b's' }), "{e:?}");
        assert!(e.to_string().contains("text"), "{e}");
        assert!(matches!(
            first_err(b"E"),
            PacketError::TextLine { first: b'E' }
        ));
    }

    #[test]
    fn bad_magic() {
        let e = first_err(b"\0REX\0\0\0\x06\0\0\0\0");
        assert!(
            matches!(e, PacketError::BadMagic { found } if &found == b"\0REX"),
            "{e:?}"
        );
        assert!(matches!(
            first_err(b"\0\0\0\0"),
            PacketError::BadMagic { .. }
        ));
        // Not yet decidable on three bytes.
        assert!(first(b"\0RE", 1024).unwrap().is_none());
    }

    #[test]
    fn request_magic_from_the_server() {
        let e = first_err(&enc(ToServer::GrabJob));
        assert!(
            matches!(
                e,
                PacketError::WrongMagic {
                    packet: PacketType(code::GRAB_JOB),
                    found: Magic::Req,
                    expected: Magic::Res
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("GRAB_JOB (9)"), "{e}");
        // Even a type the server may send, with \0REQ, is refused.
        let mut b = Vec::new();
        encode_raw(Magic::Req, code::NOOP, &[], &mut b);
        assert!(matches!(first_err(&b), PacketError::WrongMagic { .. }));
    }

    #[test]
    fn unknown_types() {
        for code in [0u32, 5, 43, 1000, u32::MAX] {
            let mut b = Vec::new();
            encode_raw(Magic::Res, code, &[b"x"], &mut b);
            let e = first_err(&b);
            assert!(
                matches!(e, PacketError::UnknownType { code: c } if c == code),
                "{e:?}"
            );
            assert!(
                e.to_string().contains(&format!("unknown type {code}")),
                "{e}"
            );
        }
    }

    #[test]
    fn types_a_worker_does_not_take_are_refused_on_the_header() {
        // JOB_CREATED, WORK_STATUS/COMPLETE/FAIL (forwarded to clients), STATUS_RES, and a
        // request type sent with \0RES: refused from the header, before the body arrives.
        for code in [8u32, 12, 13, 14, 20, 25, 28, 29, 42, 1, 9, 24] {
            let header = [
                b"\0RES".as_slice(),
                &code.to_be_bytes(),
                &100u32.to_be_bytes(),
            ]
            .concat();
            let e = first_err(&header);
            assert!(
                matches!(e, PacketError::Unexpected { packet: PacketType(c), magic: Magic::Res } if c == code),
                "{code}: {e:?}"
            );
            let name = packet_name(code).unwrap();
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn too_few_separators() {
        let e = first_err(b"\0RES\0\0\0\x0b\0\0\0\x06H:1\0fn");
        assert!(
            matches!(
                e,
                PacketError::MissingArgs {
                    packet: PacketType(code::JOB_ASSIGN),
                    expected: 2,
                    found: 1
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("JOB_ASSIGN (11)"), "{e}");
        let e = first_err(b"\0RES\0\0\0\x1f\0\0\0\x04a\0bc");
        assert!(matches!(
            e,
            PacketError::MissingArgs {
                packet: PacketType(code::JOB_ASSIGN_UNIQ),
                expected: 3,
                found: 1
            }
        ));
        let e = first_err(b"\0RES\0\0\0\x28\0\0\0\x07a\0b\0c\0d");
        assert!(matches!(
            e,
            PacketError::MissingArgs {
                packet: PacketType(code::JOB_ASSIGN_ALL),
                expected: 4,
                found: 3
            }
        ));
        let e = first_err(b"\0RES\0\0\0\x13\0\0\0\x05nonul");
        assert!(matches!(
            e,
            PacketError::MissingArgs {
                packet: PacketType(code::ERROR),
                expected: 1,
                found: 0
            }
        ));
        let e = first_err(b"\0RES\0\0\0\x0b\0\0\0\0");
        assert!(matches!(e, PacketError::MissingArgs { found: 0, .. }));
        // And from a worker.
        let e = parse_to_server(code::WORK_STATUS, b"H:1\x0050").unwrap_err();
        assert!(matches!(
            e,
            PacketError::MissingArgs {
                expected: 2,
                found: 1,
                ..
            }
        ));
        let e = parse_to_server(code::WORK_COMPLETE, b"H:1").unwrap_err();
        assert!(matches!(
            e,
            PacketError::MissingArgs {
                expected: 1,
                found: 0,
                ..
            }
        ));
        let e = parse_to_server(code::CAN_DO_TIMEOUT, b"f").unwrap_err();
        assert!(matches!(e, PacketError::MissingArgs { .. }));
    }

    #[test]
    fn numbers_must_be_decimal() {
        let bad = |code: u32, body: &[u8], field: &str| {
            let e = parse_to_server(code, body).unwrap_err();
            assert!(
                matches!(e, PacketError::BadNumber { packet: PacketType(c), field: f } if c == code && f == field),
                "{body:?}: {e:?}"
            );
            assert!(e.to_string().contains(packet_name(code).unwrap()), "{e}");
        };
        bad(code::WORK_STATUS, b"H\0x5\x00100", "numerator");
        bad(code::WORK_STATUS, b"H\0\x00100", "numerator");
        bad(code::WORK_STATUS, b"H\x001\0", "denominator");
        bad(code::WORK_STATUS, b"H\x001\0-1", "denominator");
        bad(code::WORK_STATUS, b"H\x001\x004294967296", "denominator");
        bad(code::WORK_STATUS, b"H\x001\x00 2", "denominator");
        bad(code::WORK_STATUS, b"H\x001\x002\0", "denominator");
        bad(code::CAN_DO_TIMEOUT, b"f\0", "timeout");
        bad(code::CAN_DO_TIMEOUT, b"f\x001.5", "timeout");
        bad(code::CAN_DO_TIMEOUT, b"f\x00+1", "timeout");
        assert_eq!(
            parse_to_server(code::WORK_STATUS, b"H\x000007\x004294967295").unwrap(),
            ToServer::WorkStatus {
                handle: b"H",
                numerator: 7,
                denominator: u32::MAX
            }
        );
    }

    #[test]
    fn a_body_over_the_limit_is_refused_from_the_header() {
        let header = b"\0RES\0\0\0\x0b\0\0\x04\x01"; // JOB_ASSIGN of 1025 bytes
        let mut d = Decoder::new(1024);
        assert_eq!(d.feed(header), HEADER_LEN);
        let e = d.next().unwrap_err();
        assert!(
            matches!(
                e,
                PacketError::TooLarge {
                    packet: PacketType(code::JOB_ASSIGN),
                    size: 1025,
                    max: 1024
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("JOB_ASSIGN (11)"), "{e}");
        assert_eq!(d.buffered(), HEADER_LEN);
        // Exactly at the limit is fine.
        let mut d = Decoder::new(6);
        let b = Srv::Echo(b"abcdef".to_vec()).bytes();
        assert_eq!(d.feed(&b), b.len());
        assert_eq!(d.next().unwrap(), Some(FromServer::EchoRes(b"abcdef")));
        // decode_raw checks it the same way.
        assert!(matches!(
            decode_raw(header, 1024),
            Err(PacketError::TooLarge { size: 1025, .. })
        ));
        assert!(decode_raw(header, 1025).unwrap().is_none());
    }

    #[test]
    fn noop_and_no_job_with_a_body() {
        for code in [code::NOOP, code::NO_JOB] {
            // Refused on the header, the body never buffered.
            let header = [
                b"\0RES".as_slice(),
                &code.to_be_bytes(),
                &1u32.to_be_bytes(),
            ]
            .concat();
            let e = first_err(&header);
            assert!(
                matches!(e, PacketError::NotEmpty { packet: PacketType(c), len: 1 } if c == code),
                "{e:?}"
            );
            assert!(e.to_string().contains(packet_name(code).unwrap()), "{e}");
            assert!(matches!(
                parse_from_server(code, b"x"),
                Err(PacketError::NotEmpty { .. })
            ));
        }
        for code in [
            code::RESET_ABILITIES,
            code::PRE_SLEEP,
            code::GRAB_JOB,
            code::GRAB_JOB_UNIQ,
            code::GRAB_JOB_ALL,
        ] {
            assert!(matches!(
                parse_to_server(code, b"\0"),
                Err(PacketError::NotEmpty { len: 1, .. })
            ));
        }
    }

    #[test]
    fn worker_packets_jobhost_does_not_send() {
        for code in [code::ALL_YOURS, 7, code::JOB_ASSIGN, code::NOOP] {
            let e = parse_to_server(code, b"").unwrap_err();
            assert!(
                matches!(
                    e,
                    PacketError::Unexpected {
                        magic: Magic::Req,
                        ..
                    }
                ),
                "{e:?}"
            );
        }
        assert!(matches!(
            parse_to_server(5, b""),
            Err(PacketError::UnknownType { code: 5 })
        ));
    }

    #[test]
    fn an_error_stays() {
        let mut d = Decoder::new(64);
        let mut b = Srv::Noop.bytes();
        b.extend_from_slice(b"\0RES\0\0\0\x08\0\0\0\0"); // JOB_CREATED
        b.extend_from_slice(&Srv::NoJob.bytes());
        assert_eq!(d.feed(&b), b.len());
        assert_eq!(d.next().unwrap(), Some(FromServer::Noop));
        assert!(matches!(d.next(), Err(PacketError::Unexpected { .. })));
        assert!(matches!(d.next(), Err(PacketError::Unexpected { .. })));
    }

    // ---- reading ----

    #[test]
    fn closed_between_packets() {
        let mut d = Decoder::new(64);
        assert!(matches!(
            d.read_from(&mut Script::new(vec![])).unwrap(),
            Fill::Closed
        ));
        let mut src = Script::new(vec![Ok(Srv::NoJob.bytes())]);
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Read(12)));
        assert_eq!(d.next().unwrap(), Some(FromServer::NoJob));
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Closed));
    }

    #[test]
    fn closed_mid_packet() {
        let bytes = b"\0RES\0\0\0\x0b\0\0\0\x14H:lap:1\0reverse\0test";
        let mut d = Decoder::new(64);
        let mut src = Script::new(vec![Ok(bytes[..20].to_vec())]);
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Read(20)));
        assert_eq!(d.next().unwrap(), None);
        let e = d.read_from(&mut src).unwrap_err();
        assert!(
            matches!(
                e,
                PacketError::Truncated {
                    packet: Some(PacketType(code::JOB_ASSIGN)),
                    have: 20,
                    need: 32
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("JOB_ASSIGN (11)"), "{e}");

        let mut d = Decoder::new(64);
        let mut src = Script::new(vec![Ok(bytes[..5].to_vec())]);
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Read(5)));
        let e = d.read_from(&mut src).unwrap_err();
        assert!(
            matches!(
                e,
                PacketError::Truncated {
                    packet: None,
                    have: 5,
                    need: 12
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("header"), "{e}");
    }

    #[test]
    fn interrupted_reads_are_retried() {
        let mut d = Decoder::new(64);
        let mut src = Script::new(vec![
            Err(io::ErrorKind::Interrupted.into()),
            Err(io::ErrorKind::Interrupted.into()),
            Ok(Srv::Noop.bytes()),
        ]);
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Read(12)));
        assert_eq!(d.next().unwrap(), Some(FromServer::Noop));
    }

    #[test]
    fn would_block_and_errors() {
        let mut d = Decoder::new(64);
        let mut src = Script::new(vec![
            Err(io::ErrorKind::WouldBlock.into()),
            Err(io::Error::from_raw_os_error(104)), // ECONNRESET
        ]);
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::WouldBlock));
        let e = d.read_from(&mut src).unwrap_err();
        assert!(
            matches!(&e, PacketError::Io(io) if io.raw_os_error() == Some(104)),
            "{e:?}"
        );
    }

    #[test]
    fn reads_stop_at_the_limit() {
        // A server that sends forever: the decoder takes one packet's worth and no more.
        let max = 100_000;
        let mut head = Vec::new();
        encode_raw(Magic::Res, code::JOB_ASSIGN, &[b"h", b"f", b""], &mut head);
        head.truncate(8);
        head.extend_from_slice(&u32::try_from(max).unwrap().to_be_bytes());
        head.extend_from_slice(b"h\0f\0");
        let mut src = head.chain(io::repeat(b'x'));
        let mut d = Decoder::new(max);
        let mut reads = 0;
        loop {
            match d.read_from(&mut src).unwrap() {
                Fill::Read(0) => break,
                Fill::Read(_) => reads += 1,
                other => panic!("{other:?}"),
            }
            assert!(d.buffered() <= d.limit());
            assert!(d.buf.len() <= d.limit());
        }
        assert!(reads >= 2);
        assert_eq!(d.buffered(), d.limit());
        match d.next().unwrap() {
            Some(FromServer::JobAssign { workload, .. }) => {
                assert_eq!(workload.len(), max - 4);
                assert!(workload.iter().all(|&b| b == b'x'));
            }
            other => panic!("{other:?}"),
        }
        // Room again: the next read compacts and goes on.
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Read(_)));
        assert!(d.buf.len() <= d.limit());
    }

    #[test]
    fn an_announced_body_is_not_allocated_ahead() {
        let mut d = Decoder::new(64 << 20);
        let header = b"\0RES\0\0\0\x0b\x03\xff\xff\xff".to_vec(); // ~64 MiB
        let mut src = Script::new(vec![Ok(header), Ok(vec![0; 100])]);
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Read(12)));
        assert!(matches!(d.read_from(&mut src).unwrap(), Fill::Read(100)));
        assert!(d.buf.len() <= 2 * READ_CHUNK, "{}", d.buf.len());
        d.shrink(); // not empty: keeps it
        assert_eq!(d.buffered(), 112);
    }

    #[test]
    fn shrink_gives_memory_back() {
        let mut d = Decoder::new(1 << 20);
        let b = Srv::Echo(vec![1; 200_000]).bytes();
        let mut src = Script::new(vec![Ok(b)]);
        while !matches!(d.read_from(&mut src).unwrap(), Fill::Closed) {
            while d.next().unwrap().is_some() {}
        }
        assert!(d.buf.len() >= 200_000);
        d.shrink();
        assert_eq!(d.buf.len(), 0);
        assert_eq!(d.limit(), HEADER_LEN + (1 << 20));
    }

    #[test]
    fn next_raw_reads_worker_packets() {
        let mut b = enc(ToServer::CanDo(b"f"));
        b.extend_from_slice(&enc(ToServer::WorkComplete {
            handle: b"H:1",
            data: b"r\0r",
        }));
        let mut d = Decoder::new(64);
        assert_eq!(d.feed(&b), b.len());
        let p = d.next_raw(Magic::Req).unwrap().unwrap();
        assert_eq!(
            parse_to_server(p.code, p.body).unwrap(),
            ToServer::CanDo(b"f")
        );
        let p = d.next_raw(Magic::Req).unwrap().unwrap();
        assert_eq!(
            parse_to_server(p.code, p.body).unwrap(),
            ToServer::WorkComplete {
                handle: b"H:1",
                data: b"r\0r"
            }
        );
        assert!(d.next_raw(Magic::Req).unwrap().is_none());
        assert_eq!(d.feed(&Srv::Noop.bytes()), 12);
        assert!(matches!(
            d.next_raw(Magic::Req),
            Err(PacketError::WrongMagic {
                found: Magic::Res,
                ..
            })
        ));
    }

    #[test]
    fn feed_takes_what_fits() {
        let mut b = Vec::new();
        for _ in 0..5 {
            b.extend_from_slice(&Srv::Echo(b"12345678".to_vec()).bytes()); // 20 bytes each
        }
        let mut d = Decoder::new(8); // limit 20: one packet at a time
        let mut rest = b.as_slice();
        let mut got = 0;
        while !rest.is_empty() {
            let n = d.feed(rest);
            assert!(n > 0 && d.buffered() <= 20);
            rest = &rest[n..];
            while let Some(p) = d.next().unwrap() {
                assert_eq!(p, FromServer::EchoRes(b"12345678"));
                got += 1;
            }
        }
        assert_eq!(got, 5);
        assert!(d.buf.len() <= 20);
    }

    // ---- properties ----

    /// An argument before the last: no NUL.
    fn arg() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(1u8..=255, 0..10)
    }

    /// Trailing data, NULs likely.
    fn data(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..max)
    }

    fn srv(max: usize) -> impl Strategy<Value = Srv> {
        prop_oneof![
            Just(Srv::Noop),
            Just(Srv::NoJob),
            (arg(), arg(), data(max)).prop_map(|(handle, function, workload)| Srv::Assign {
                handle,
                function,
                unique: None,
                reducer: None,
                workload
            }),
            (arg(), arg(), arg(), data(max)).prop_map(|(handle, function, u, workload)| {
                Srv::Assign {
                    handle,
                    function,
                    unique: Some(u),
                    reducer: None,
                    workload,
                }
            }),
            (arg(), arg(), arg(), arg(), data(max)).prop_map(
                |(handle, function, u, r, workload)| {
                    Srv::Assign {
                        handle,
                        function,
                        unique: Some(u),
                        reducer: Some(r),
                        workload,
                    }
                }
            ),
            data(max).prop_map(Srv::Echo),
            (arg(), data(max)).prop_map(|(code, text)| Srv::Error { code, text }),
            data(max).prop_map(Srv::OptionRes),
        ]
    }

    /// Decodes `stream` fed in chunks of the given sizes (cycled), draining after each.
    fn decode_chunked(stream: &[u8], sizes: &[usize], max_body: usize) -> Vec<Srv> {
        let mut d = Decoder::new(max_body);
        let mut out = Vec::new();
        let mut rest = stream;
        let mut sizes = sizes.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).clamp(1, rest.len());
            let (mut chunk, tail) = rest.split_at(n);
            rest = tail;
            while !chunk.is_empty() {
                let took = d.feed(chunk);
                chunk = &chunk[took..];
                let mut drained = false;
                while let Some(p) = d.next().unwrap() {
                    out.push(Srv::of(&p));
                    drained = true;
                }
                assert!(took > 0 || drained, "stuck with {} buffered", d.buffered());
                assert!(d.buffered() <= d.limit());
            }
        }
        assert_eq!(d.buffered(), 0);
        out
    }

    /// A reader that hands out `data` in chunks of the given sizes (cycled).
    struct Chunked<'a> {
        data: &'a [u8],
        sizes: &'a [usize],
        i: usize,
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let size = self.sizes[self.i % self.sizes.len()].max(1);
            self.i += 1;
            let n = size.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// A whole worker packet, owned, to build a [`ToServer`] from.
    fn to_server_case() -> impl Strategy<Value = (u8, Vec<u8>, Vec<u8>, u32, u32)> {
        (0u8..17, arg(), data(64), any::<u32>(), any::<u32>())
    }

    fn build<'a>(kind: u8, a: &'a [u8], d: &'a [u8], n: u32, m: u32) -> ToServer<'a> {
        match kind {
            0 => ToServer::CanDo(d),
            1 => ToServer::CanDoTimeout {
                function: a,
                timeout_ms: n,
            },
            2 => ToServer::CantDo(d),
            3 => ToServer::ResetAbilities,
            4 => ToServer::PreSleep,
            5 => ToServer::GrabJob,
            6 => ToServer::GrabJobUniq,
            7 => ToServer::GrabJobAll,
            8 => ToServer::WorkStatus {
                handle: a,
                numerator: n,
                denominator: m,
            },
            9 => ToServer::WorkComplete { handle: a, data: d },
            10 => ToServer::WorkFail { handle: d },
            11 => ToServer::WorkException { handle: a, data: d },
            12 => ToServer::WorkData { handle: a, data: d },
            13 => ToServer::WorkWarning { handle: a, data: d },
            14 => ToServer::SetClientId(d),
            15 => ToServer::EchoReq(d),
            _ => ToServer::OptionReq(d),
        }
    }

    proptest! {
        /// (1) Server packets built with encode_raw decode to the same fields.
        #[test]
        fn server_packets_round_trip(p in srv(300)) {
            let bytes = p.bytes();
            let got = first(&bytes, 4096).unwrap();
            prop_assert_eq!(got, Some(p));
        }

        /// (1b) Worker packets from ToServer::encode parse back to themselves.
        #[test]
        fn worker_packets_round_trip((kind, a, d, n, m) in to_server_case()) {
            let p = build(kind, &a, &d, n, m);
            let bytes = enc(p);
            let (raw, used) = decode_raw(&bytes, 4096).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(raw.magic, Magic::Req);
            prop_assert_eq!(parse_to_server(raw.code, raw.body).unwrap(), p);
            let mut head = Vec::new();
            let tail = p.encode_head(&mut head);
            head.extend_from_slice(tail);
            prop_assert_eq!(head, bytes);
        }

        /// (2) A stream cut anywhere yields the same packets, whatever the chunks.
        #[test]
        fn chunking_does_not_matter(
            packets in proptest::collection::vec(srv(100), 0..10),
            sizes in proptest::collection::vec(1usize..40, 1..6),
        ) {
            let mut stream = Vec::new();
            for p in &packets {
                p.encode(&mut stream);
            }
            let max_body = 512;
            prop_assert_eq!(&decode_chunked(&stream, &[usize::MAX], max_body), &packets);
            prop_assert_eq!(&decode_chunked(&stream, &[1], max_body), &packets);
            prop_assert_eq!(&decode_chunked(&stream, &sizes, max_body), &packets);

            // The same through read_from, the reader handing out odd chunks.
            let mut src = Chunked { data: &stream, sizes: &sizes, i: 0 };
            let mut d = Decoder::new(max_body);
            let mut got = Vec::new();
            loop {
                while let Some(p) = d.next().unwrap() {
                    got.push(Srv::of(&p));
                }
                match d.read_from(&mut src).unwrap() {
                    Fill::Closed => break,
                    Fill::Read(n) => prop_assert!(n > 0),
                    Fill::WouldBlock => prop_assert!(false, "no WouldBlock here"),
                }
                prop_assert!(d.buf.len() <= d.limit());
            }
            prop_assert_eq!(&got, &packets);
        }

        /// (3) Random bytes never panic, and the buffer never outgrows header + max_body.
        #[test]
        fn random_bytes_are_safe(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..400),
                // Mostly well-formed headers, to get past the magic.
                (0u32..45, 0u32..80, proptest::collection::vec(any::<u8>(), 0..200))
                    .prop_map(|(code, size, body)| {
                        [b"\0RES".as_slice(), &code.to_be_bytes(), &size.to_be_bytes(), &body]
                            .concat()
                    }),
            ],
            max_body in 0usize..64,
            sizes in proptest::collection::vec(1usize..32, 1..6),
        ) {
            let mut d = Decoder::new(max_body);
            let mut rest = bytes.as_slice();
            let mut sizes = sizes.iter().cycle();
            'feed: while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                let took = d.feed(&rest[..n]);
                rest = &rest[took..];
                prop_assert!(d.buffered() <= HEADER_LEN + max_body);
                prop_assert!(d.buf.len() <= HEADER_LEN + max_body);
                let mut progressed = took > 0;
                loop {
                    match d.next() {
                        Ok(Some(_)) => progressed = true,
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                prop_assert!(progressed, "stuck without an error");
            }
            // The pure parsers, on anything.
            let _ = decode_raw(&bytes, max_body);
            if let Some(code) = bytes.get(..4) {
                let code = u32::from_be_bytes(code.try_into().unwrap()) % 50;
                let _ = parse_from_server(code, &bytes[4..]);
                let _ = parse_to_server(code, &bytes[4..]);
            }
        }

        /// (4) Every strict prefix of a valid packet is "not yet", never an error.
        #[test]
        fn prefixes_are_incomplete(p in srv(40), (kind, a, d, n, m) in to_server_case()) {
            let bytes = p.bytes();
            for cut in 0..bytes.len() {
                prop_assert!(first(&bytes[..cut], 4096).unwrap().is_none(), "cut at {}", cut);
                prop_assert!(decode_raw(&bytes[..cut], 4096).unwrap().is_none());
            }
            let worker = enc(build(kind, &a, &d, n, m));
            for cut in 0..worker.len() {
                let mut dec = Decoder::new(4096);
                prop_assert_eq!(dec.feed(&worker[..cut]), cut);
                prop_assert!(dec.next_raw(Magic::Req).unwrap().is_none(), "cut at {}", cut);
            }
        }
    }
}
