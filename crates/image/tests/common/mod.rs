//! What the crash explorers share: deterministic choices, and the
//! survivors of a power cut drawn from them (the project's shared test
//! support).

pub use ploop_test_support::Rng;
