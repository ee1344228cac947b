//! The farm coordinator.
