//! tandem-cluster (in progress)
