//! The worker side of the Gearman protocol.

pub mod packet;
