//! `jobhost submit` to a Redis-fed pool: same output, order and exit status as a socket pool.
