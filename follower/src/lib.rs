//! tandem-follower (in progress)
