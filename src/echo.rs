//! `/echo`: every message goes back to its sender (Autobahn and benchmarks use it).
