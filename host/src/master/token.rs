//! What an fd in the master's epoll set is: one [`Token`] per registration, encoded into the
//! epoll event's 64-bit data and decoded from it, in this one place (the kind in the top four
//! bits, an id below).
//!
//! Owns the encoding only; never touches epoll or an fd.

/// An epoll registration of the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    /// The self-pipe of the signal handlers.
    Signals,
    /// The job socket's listener.
    Listener,
    /// The admin socket's listener (Unix), or its TCP listener.
    AdminListener { tcp: bool },
    /// A job client's connection.
    Client(u64),
    /// A worker's socketpair.
    Worker(u64),
    /// An admin session.
    Admin(u64),
    /// A reload probe's pipe.
    Probe(u64),
}

const SHIFT: u32 = 60;
const ID: u64 = (1 << SHIFT) - 1;
// Kinds. Kind 0 holds the fixed tokens (ids below).
const FIXED: u64 = 0;
const CLIENT: u64 = 1;
const WORKER: u64 = 2;
const ADMIN: u64 = 3;
const PROBE: u64 = 4;
const SIGNALS: u64 = 0;
const LISTENER: u64 = 1;
const ADMIN_UNIX: u64 = 2;
const ADMIN_TCP: u64 = 3;

impl Token {
    pub(super) fn encode(self) -> u64 {
        let (kind, id) = match self {
            Token::Signals => (FIXED, SIGNALS),
            Token::Listener => (FIXED, LISTENER),
            Token::AdminListener { tcp: false } => (FIXED, ADMIN_UNIX),
            Token::AdminListener { tcp: true } => (FIXED, ADMIN_TCP),
            Token::Client(id) => (CLIENT, id),
            Token::Worker(id) => (WORKER, id),
            Token::Admin(id) => (ADMIN, id),
            Token::Probe(id) => (PROBE, id),
        };
        debug_assert!(id <= ID, "id {id} does not fit a token");
        (kind << SHIFT) | (id & ID)
    }

    /// `None` for data the master never registered.
    pub(super) fn decode(data: u64) -> Option<Token> {
        let id = data & ID;
        Some(match data >> SHIFT {
            FIXED => match id {
                SIGNALS => Token::Signals,
                LISTENER => Token::Listener,
                ADMIN_UNIX => Token::AdminListener { tcp: false },
                ADMIN_TCP => Token::AdminListener { tcp: true },
                _ => return None,
            },
            CLIENT => Token::Client(id),
            WORKER => Token::Worker(id),
            ADMIN => Token::Admin(id),
            PROBE => Token::Probe(id),
            _ => return None,
        })
    }
}

impl From<Token> for u64 {
    fn from(token: Token) -> u64 {
        token.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_decodes_to_itself() {
        let big = ID;
        for token in [
            Token::Signals,
            Token::Listener,
            Token::AdminListener { tcp: false },
            Token::AdminListener { tcp: true },
            Token::Client(0),
            Token::Client(big),
            Token::Worker(7),
            Token::Admin(1 << 40),
            Token::Probe(3),
        ] {
            assert_eq!(Token::decode(token.encode()), Some(token), "{token:?}");
        }
        let mut seen = std::collections::HashSet::new();
        for token in [
            Token::Client(5),
            Token::Worker(5),
            Token::Admin(5),
            Token::Probe(5),
        ] {
            assert!(seen.insert(token.encode()), "{token:?} collides");
        }
    }

    #[test]
    fn unknown_data_is_none() {
        assert_eq!(Token::decode(4), None);
        assert_eq!(Token::decode(15 << SHIFT), None);
        assert_eq!(Token::decode(5 << SHIFT | 1), None);
    }
}
