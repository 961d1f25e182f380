//! The labeled tasks `attune eval` runs; each turns its data into `Item`s.

pub mod custom;
pub mod passkey;
pub mod sentiment;
