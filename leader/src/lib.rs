//! tandem-leader (in progress)
