//! Hub tests: no threads, no sockets, a fixed clock.
