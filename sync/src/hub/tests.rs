//! Unit tests of the hub: store, ACL text, config.
