//! The mio event loop.
