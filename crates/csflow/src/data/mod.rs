//! Data sets the flow trains and is tested on.

pub mod toy;
