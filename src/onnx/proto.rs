//! Small read helpers over the protobuf types: attributes, data types, initializer lookups.

use std::collections::HashMap;

use super::pb;

/// An integer attribute of a node, if present.
pub fn attr_int(node: &pb::NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// An integer-list attribute of a node, if present.
pub fn attr_ints<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a [i64]> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.as_slice())
}

/// The ONNX name of a tensor element type, as users see it in exporters (`float32`, `int64`, ...).
pub fn dtype_name(elem_type: i32) -> &'static str {
    use pb::tensor_proto::DataType as T;
    match T::try_from(elem_type) {
        Ok(T::Float) => "float32",
        Ok(T::Double) => "float64",
        Ok(T::Float16) => "float16",
        Ok(T::Bfloat16) => "bfloat16",
        Ok(T::Int64) => "int64",
        Ok(T::Int32) => "int32",
        Ok(T::Int16) => "int16",
        Ok(T::Int8) => "int8",
        Ok(T::Uint8) => "uint8",
        Ok(T::Bool) => "bool",
        Ok(T::String) => "string",
        _ => "unknown",
    }
}

/// The element type of a value_info, if it is a tensor.
pub fn value_elem_type(info: &pb::ValueInfoProto) -> Option<i32> {
    match info.r#type.as_ref()?.value.as_ref()? {
        pb::type_proto::Value::TensorType(t) => Some(t.elem_type),
    }
}

/// Initializers of a graph by name.
pub fn initializers(graph: &pb::GraphProto) -> HashMap<&str, &pb::TensorProto> {
    graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect()
}

/// The float values of an initializer (raw or typed storage), or None if it is not float32.
pub fn float_values(tensor: &pb::TensorProto) -> Option<Vec<f32>> {
    if tensor.data_type != pb::tensor_proto::DataType::Float as i32 {
        return None;
    }
    if !tensor.raw_data.is_empty() {
        Some(
            tensor
                .raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    } else {
        Some(tensor.float_data.clone())
    }
}

/// The ai.onnx opset a model imports (0 when it declares none).
pub fn onnx_opset(model: &pb::ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}
