//! The farm builder.
