//! Small read helpers over the protobuf types: attributes, data types, initializer lookups.

use std::collections::HashMap;

use super::pb;

/// How messages name a node: its name, else the op and its first output.
pub fn node_label(node: &pb::NodeProto) -> String {
    if node.name.is_empty() {
        format!(
            "{}->{}",
            node.op_type,
            node.output.first().map(String::as_str).unwrap_or("?")
        )
    } else {
        node.name.clone()
    }
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

/// Every name a graph already uses (node outputs and names, initializers, inputs, outputs), so
/// that names added to it stay unique.
pub fn names_in(graph: &pb::GraphProto) -> impl Iterator<Item = String> + '_ {
    graph
        .node
        .iter()
        .flat_map(|n| {
            n.output
                .iter()
                .cloned()
                .chain(std::iter::once(n.name.clone()))
        })
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .chain(graph.input.iter().map(|i| i.name.clone()))
        .chain(graph.output.iter().map(|o| o.name.clone()))
}

/// A tensor value_info: `name`, element type, and dims (numbers or symbols such as the batch).
pub fn tensor_info(
    name: &str,
    elem_type: pb::tensor_proto::DataType,
    dims: impl IntoIterator<Item = pb::tensor_shape_proto::dimension::Value>,
) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::Dimension;
    let dim = dims
        .into_iter()
        .map(|value| Dimension {
            value: Some(value),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Fixed dims as value_info dims.
pub fn fixed_dims(dims: &[i64]) -> Vec<pb::tensor_shape_proto::dimension::Value> {
    dims.iter()
        .map(|&d| pb::tensor_shape_proto::dimension::Value::DimValue(d))
        .collect()
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

/// The values of an int64 tensor (raw or typed storage), or None if it is not int64.
pub fn int_values(tensor: &pb::TensorProto) -> Option<Vec<i64>> {
    if tensor.data_type != pb::tensor_proto::DataType::Int64 as i32 {
        return None;
    }
    if !tensor.raw_data.is_empty() {
        Some(
            tensor
                .raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        )
    } else {
        Some(tensor.int64_data.clone())
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

/// Bytes a tensor of fixed-size elements needs, from its dims and data type.
pub fn expected_bytes(tensor: &pb::TensorProto) -> Option<usize> {
    use pb::tensor_proto::DataType as T;
    let size = match T::try_from(tensor.data_type).ok()? {
        T::Float | T::Int32 | T::Uint32 => 4,
        T::Double | T::Int64 | T::Uint64 | T::Complex64 => 8,
        T::Float16 | T::Bfloat16 | T::Int16 | T::Uint16 => 2,
        T::Int8 | T::Uint8 | T::Bool => 1,
        _ => return None,
    };
    let count = tensor
        .dims
        .iter()
        .try_fold(1i64, |acc, &d| acc.checked_mul(d))?;
    usize::try_from(count).ok()?.checked_mul(size)
}

/// The most elements a tensor of a model may declare (2^34, 64 GiB of float32).
const MAX_ELEMENTS: i64 = 1 << 34;
/// An empty tensor's other dims may multiply to this much at most (2^16).
const MAX_EMPTY_EXTENT: i64 = 1 << 16;

/// Checks that a tensor holds as many values as its dims say (a damaged or hostile file may
/// declare dims far larger than its data, which would make later stages allocate without bound).
pub fn check_tensor_size(tensor: &pb::TensorProto) -> std::result::Result<(), String> {
    if tensor.dims.iter().any(|&d| d < 0) {
        return Err(format!("has negative dims {:?}", tensor.dims));
    }
    // Even an empty tensor must not declare sizes that shape inference would allocate from.
    let nonzero = tensor
        .dims
        .iter()
        .filter(|&&d| d > 0)
        .try_fold(1i64, |acc, &d| acc.checked_mul(d));
    let limit = if tensor.dims.contains(&0) {
        MAX_EMPTY_EXTENT
    } else {
        MAX_ELEMENTS
    };
    if nonzero.is_none_or(|n| n > limit) {
        return Err(format!(
            "declares dims {:?}, beyond any real network's",
            tensor.dims
        ));
    }
    let count = tensor
        .dims
        .iter()
        .try_fold(1i64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("has dims {:?} whose product overflows", tensor.dims))?;
    if !tensor.raw_data.is_empty() {
        return match expected_bytes(tensor) {
            Some(bytes) if bytes != tensor.raw_data.len() => Err(format!(
                "declares dims {:?} ({bytes} bytes) but holds {} bytes",
                tensor.dims,
                tensor.raw_data.len()
            )),
            _ => Ok(()),
        };
    }
    if tensor.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
        return Ok(());
    }
    let stored = tensor.float_data.len()
        + tensor.int32_data.len()
        + tensor.int64_data.len()
        + tensor.double_data.len()
        + tensor.uint64_data.len()
        + tensor.string_data.len();
    let complex = [
        pb::tensor_proto::DataType::Complex64 as i32,
        pb::tensor_proto::DataType::Complex128 as i32,
    ];
    if !complex.contains(&tensor.data_type) && stored as i64 != count {
        return Err(format!(
            "declares dims {:?} ({count} values) but holds {stored}",
            tensor.dims
        ));
    }
    Ok(())
}
