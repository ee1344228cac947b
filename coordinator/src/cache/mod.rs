//! (being written: see the lead's plan)
