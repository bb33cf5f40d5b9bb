//! Many masters on one stream: split work, a whole host killed, no entry worked on twice.
