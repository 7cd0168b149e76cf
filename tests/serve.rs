//! `sanctum serve` driven over HTTP: concurrency, limits and hostile requests.
