//! The supervisor's decisions, driven with events and no processes at all.

use super::*;
