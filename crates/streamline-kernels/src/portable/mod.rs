pub mod conv;
pub mod linear;
pub mod norm;
mod tiles;
