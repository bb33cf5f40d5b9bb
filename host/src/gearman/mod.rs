//! The worker side of the Gearman protocol.

pub mod admin;
pub mod packet;
