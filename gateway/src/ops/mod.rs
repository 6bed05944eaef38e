//! The operational parts: logs, metrics and the admin listener, systemd
//! notification, and the drain on SIGTERM. The data path reports to them;
//! they read nothing of it but what it reports (and the configuration).

pub mod admin;
pub mod drain;
pub mod logs;
pub mod metrics;
pub mod service;
