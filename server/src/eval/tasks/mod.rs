//! The labeled tasks `attune eval` runs; each turns its data into [`Item`](super::item::Item)s.

pub mod custom;
pub mod passkey;
pub mod sentiment;
