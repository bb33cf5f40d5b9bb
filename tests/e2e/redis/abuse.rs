//! Redis pools under abuse: pauses, permissions, server errors, restarts with persistence, keys of the wrong type.
