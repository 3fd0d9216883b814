//! ONNX model I/O and edits on the protobuf types that tract-onnx ships (`tract_onnx::pb`).

pub mod blocks;
pub mod builder;
pub mod edit;
pub mod io;
pub mod metadata;
pub mod normalize;
pub mod ort_forms;
pub mod ort_training;
pub mod prepare;
pub mod proto;
pub mod validate;

pub use tract_onnx::pb;
