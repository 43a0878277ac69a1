//! Pure domain logic: no I/O, no clocks, no async. Everything that decides rather than does lives
//! here and is unit-tested without services.

pub mod fairshare;
#[cfg(test)]
mod fuzz;
pub mod listing;
pub mod outcome;
pub mod phase;
pub mod quantity;
pub mod result;
pub mod task;
pub mod tenant;
pub mod token;
pub mod validate;
