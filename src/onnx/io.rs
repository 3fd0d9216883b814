//! Reading models (external data resolved into memory) and writing files atomically (temp file, fsync, rename).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use prost::Message;

use super::pb::{self, tensor_proto::DataLocation};
use super::proto;
use crate::error::{Error, Result};

/// A model as read from disk, with every external tensor loaded into `raw_data`.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub path: PathBuf,
    pub proto: pb::ModelProto,
    /// The module path torch.export recorded for each node output (empty for other exporters).
    pub modules: HashMap<String, String>,
}

impl LoadedModel {
    pub fn graph(&self) -> &pb::GraphProto {
        self.proto
            .graph
            .as_ref()
            .expect("load_model guarantees a graph")
    }

    /// The file name for messages, as the user typed it.
    pub fn display(&self) -> String {
        self.path.display().to_string()
    }
}

/// Protobuf messages larger than this cannot be encoded in one piece (the 2 GB limit, with headroom).
pub const PROTOBUF_LIMIT: usize = 2_000_000_000;
/// Initializers at least this large go to the external data file when a model needs one.
const EXTERNAL_THRESHOLD: usize = 1024;

/// Reads and decodes an ONNX model, following external data relative to the model's folder.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let shown = path.display();
    let meta = fs::metadata(path).map_err(|e| {
        Error::io(format!(
            "cannot read `{shown}`: {}; check the path",
            io_reason(&e)
        ))
    })?;
    if meta.is_dir() {
        return Err(Error::invalid_model(format!(
            "`{shown}` is a directory, not an ONNX model; pass the .onnx file inside it"
        )));
    }
    let bytes = fs::read(path)
        .map_err(|e| Error::io(format!("cannot read `{shown}`: {}", io_reason(&e))))?;
    decode_model(&bytes, path)
}

/// Decodes a model read from `path` (external data is looked up beside it).
pub fn decode_model(bytes: &[u8], path: &Path) -> Result<LoadedModel> {
    let shown = path.display();
    if bytes.is_empty() {
        return Err(Error::invalid_model(format!(
            "`{shown}` is empty; export the model again (torch.onnx.export)"
        )));
    }
    let mut proto = pb::ModelProto::decode(bytes).map_err(|e| {
        Error::invalid_model(format!(
            "`{shown}` is not a readable ONNX model (protobuf decoding failed: {e}); \
             the file may be truncated or of another format: export it again"
        ))
    })?;
    let graph = match proto.graph.as_mut() {
        Some(g) if !g.node.is_empty() => g,
        Some(_) => {
            return Err(Error::invalid_model(format!(
                "`{shown}` has a graph with no nodes; is it really an exported network?"
            )))
        }
        None => {
            return Err(Error::invalid_model(format!(
            "`{shown}` holds no graph (not an ONNX model, or an empty one); export the model again"
        )))
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut side_files = HashMap::new();
    for tensor in &mut graph.initializer {
        resolve_external(tensor, dir, &shown.to_string(), &mut side_files)?;
    }
    Ok(LoadedModel {
        path: path.to_path_buf(),
        proto,
        modules: super::metadata::recorded_modules(bytes),
    })
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

fn is_external(tensor: &pb::TensorProto) -> bool {
    tensor.data_location == Some(DataLocation::External as i32)
}

/// Replaces an external tensor's reference by its bytes, checking that the side file exists,
/// stays inside the model's folder and is long enough.
/// `side_files` keeps each side file's bytes, read once however many tensors it holds.
fn resolve_external(
    tensor: &mut pb::TensorProto,
    dir: &Path,
    model: &str,
    side_files: &mut HashMap<PathBuf, Vec<u8>>,
) -> Result<()> {
    if !is_external(tensor) {
        return Ok(());
    }
    let entry = |key: &str| {
        tensor
            .external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    };
    let name = &tensor.name;
    let location = entry("location").ok_or_else(|| {
        Error::invalid_model(format!(
            "`{model}`: external tensor `{name}` has no location"
        ))
    })?;
    let relative = Path::new(&location);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
    {
        return Err(Error::invalid_model(format!(
            "`{model}`: tensor `{name}` points at external data `{location}` outside the model's folder; \
             keep the data file next to the model and save it with a relative location"
        )));
    }
    let number = |key: &str| -> Result<Option<u64>> {
        entry(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    Error::invalid_model(format!(
                        "`{model}`: tensor `{name}` has a bad external-data {key} `{v}`"
                    ))
                })
            })
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    let length = number("length")?;
    let file = dir.join(relative);
    if fs::symlink_metadata(&file).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::invalid_model(format!(
            "`{model}`: external data `{location}` of tensor `{name}` is a symbolic link (it may point outside the model's folder); \
             keep the data file itself next to the model"
        )));
    }
    if !side_files.contains_key(&file) {
        let bytes = fs::read(&file).map_err(|e| {
            Error::io(format!(
                "`{model}`: external data file `{}` of tensor `{name}`: {}; copy it next to the model",
                file.display(),
                io_reason(&e)
            ))
        })?;
        side_files.insert(file.clone(), bytes);
    }
    let data = &side_files[&file];
    let expected = proto::expected_bytes(tensor);
    let length = length
        .or(expected.map(|e| e as u64))
        .unwrap_or(data.len() as u64 - offset.min(data.len() as u64));
    let end = offset
        .checked_add(length)
        .filter(|&end| end <= data.len() as u64)
        .ok_or_else(|| {
            Error::invalid_model(format!(
            "`{model}`: external data file `{}` is shorter ({} bytes) than tensor `{name}` needs \
             (offset {offset} + length {length}); the file is truncated: save the model again",
            file.display(),
            data.len()
        ))
        })?;
    if let Some(expected) = expected {
        if expected as u64 != length {
            return Err(Error::invalid_model(format!(
                "`{model}`: tensor `{name}` declares {length} bytes of external data but its shape needs {expected}"
            )));
        }
    }
    tensor.raw_data = data[offset as usize..end as usize].to_vec();
    tensor.external_data.clear();
    tensor.data_location = None;
    Ok(())
}

/// A fast 64-bit fingerprint of a file's bytes, `<hex>-<length>`: the xor over its 8-byte
/// little-endian words (zero-padded) of `word * K1 ^ index * K2`. Not cryptographic: it tells a
/// graph from the graph of another merge. examples/train_ort.py computes the same with numpy.
pub fn content_hash(bytes: &[u8]) -> String {
    const K1: u64 = 0x9E37_79B9_7F4A_7C15;
    const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let mut hash = 0u64;
    // index * K2, kept as a running sum: one multiplication per word instead of two.
    let mut index_term = 0u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        hash ^= u64::from_le_bytes(word.try_into().expect("8 bytes")).wrapping_mul(K1) ^ index_term;
        index_term = index_term.wrapping_add(K2);
    }
    if !words.remainder().is_empty() {
        let mut last = [0u8; 8];
        last[..words.remainder().len()].copy_from_slice(words.remainder());
        hash ^= u64::from_le_bytes(last).wrapping_mul(K1) ^ index_term;
    }
    format!("{hash:016x}-{}", bytes.len())
}

/// Refuses an output path that names one of the input models.
pub fn ensure_not_an_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    let out = canonical_or_self(output);
    for input in inputs {
        if canonical_or_self(input) == out {
            return Err(Error::usage(format!(
                "the output `{}` is one of the input models; choose another -o path (kdgraph never overwrites its inputs)",
                output.display()
            )));
        }
    }
    Ok(())
}

fn canonical_or_self(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match (parent.canonicalize(), path.file_name()) {
            (Ok(dir), Some(name)) => dir.join(name),
            _ => path.to_path_buf(),
        }
    })
}

/// Files that are written together: each goes to a temporary file first, and all are renamed
/// into place only once every one of them is complete and synced.
#[derive(Default)]
pub struct AtomicWrite {
    staged: Vec<(PathBuf, PathBuf)>,
}

impl AtomicWrite {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `bytes` to a temporary file beside `path` and syncs it.
    pub fn stage(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        if path.is_dir() {
            return Err(Error::usage(format!(
                "cannot write `{}`: it is a folder; give a file name",
                path.display()
            )));
        }
        if self.staged.iter().any(|(_, p)| p == path) {
            return Err(Error::usage(format!(
                "`{}` would be written twice by one merge",
                path.display()
            )));
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(Error::usage(format!(
                "cannot write `{}`: the folder `{}` does not exist; create it first",
                path.display(),
                dir.display()
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(".{name}.kdgraph-{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&temp);
            return Err(Error::io(format!(
                "cannot write `{}`: {}",
                path.display(),
                io_reason(&e)
            )));
        }
        self.staged.push((temp, path.to_path_buf()));
        Ok(())
    }

    /// Moves every staged file into place, in the order staged. If one rename fails, the
    /// temporary files not yet moved are removed (by Drop).
    pub fn commit(mut self) -> Result<()> {
        let dir = self
            .staged
            .first()
            .and_then(|(_, p)| p.parent())
            .map(Path::to_path_buf);
        while let Some((temp, path)) = self.staged.first().cloned() {
            fs::rename(&temp, &path).map_err(|e| {
                Error::io(format!(
                    "cannot write `{}`: {}",
                    path.display(),
                    io_reason(&e)
                ))
            })?;
            self.staged.remove(0);
        }
        if let Some(d) = dir.and_then(|d| {
            fs::File::open(if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                &d
            })
            .ok()
        }) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for AtomicWrite {
    fn drop(&mut self) {
        for (temp, _) in &self.staged {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Encodes a model for `path`; when it would pass the protobuf limit, moves its large
/// initializers to `<file>.data` beside it and returns that side file too.
pub fn encode_model(proto: pb::ModelProto, path: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    encode_within(proto, path, PROTOBUF_LIMIT)
}

/// [`encode_model`] with the size a message may have (a parameter, so that tests reach the
/// external-data path with small models).
fn encode_within(
    mut proto: pb::ModelProto,
    path: &Path,
    limit: usize,
) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    if proto.encoded_len() > limit {
        let data_name = format!(
            "{}.data",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut data = Vec::new();
        if let Some(graph) = proto.graph.as_mut() {
            for tensor in &mut graph.initializer {
                if tensor.raw_data.len() >= EXTERNAL_THRESHOLD {
                    let offset = data.len();
                    data.extend_from_slice(&tensor.raw_data);
                    let entry = |k: &str, v: String| pb::StringStringEntryProto {
                        key: k.into(),
                        value: v,
                    };
                    tensor.external_data = vec![
                        entry("location", data_name.clone()),
                        entry("offset", offset.to_string()),
                        entry("length", tensor.raw_data.len().to_string()),
                    ];
                    tensor.data_location = Some(DataLocation::External as i32);
                    tensor.raw_data = Vec::new();
                }
            }
        }
        if proto.encoded_len() > limit {
            return Err(Error::unsupported(format!(
                "`{}` would exceed the 2 GB protobuf limit even with its weights in external data",
                path.display()
            )));
        }
        files.push((path.with_file_name(data_name), data));
    }
    files.insert(
        0,
        (path.to_path_buf(), encode_keeping_zero_attributes(proto)),
    );
    Ok(files)
}

/// Encodes a model as prost does, except that an INT or FLOAT attribute whose value is 0 keeps
/// its value field. tract's message types are proto3-style (`i: i64`), so prost leaves out a
/// zero as the default; ONNX is proto2, and ONNX Runtime reads an attribute without its field
/// as absent (`keepdims=0` then acts as the default 1, and Split's gradient builder fails on
/// `axis=0`). Field order does not matter to a protobuf reader, so each node's attributes (and
/// the graph's nodes) are written after the rest of their message.
fn encode_keeping_zero_attributes(mut model: pb::ModelProto) -> Vec<u8> {
    let Some(mut graph) = model.graph.take() else {
        return model.encode_to_vec();
    };
    let nodes: Vec<Vec<u8>> = std::mem::take(&mut graph.node)
        .into_iter()
        .map(encode_node)
        .collect();
    let graph_len =
        graph.encoded_len() + nodes.iter().map(|n| field_len(1, n.len())).sum::<usize>();
    let mut buf = Vec::with_capacity(model.encoded_len() + field_len(7, graph_len));
    model.encode(&mut buf).expect("a Vec grows as needed");
    prost::encoding::encode_key(7, prost::encoding::WireType::LengthDelimited, &mut buf);
    prost::encoding::encode_varint(graph_len as u64, &mut buf);
    graph.encode(&mut buf).expect("a Vec grows as needed");
    for node in &nodes {
        put_message(&mut buf, 1, node);
    }
    buf
}

/// The bytes of a length-delimited field `tag` holding `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

fn put_message(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

fn encode_graph(mut graph: pb::GraphProto) -> Vec<u8> {
    let nodes = std::mem::take(&mut graph.node);
    let mut buf = graph.encode_to_vec();
    for node in nodes {
        put_message(&mut buf, 1, &encode_node(node));
    }
    buf
}

fn encode_node(mut node: pb::NodeProto) -> Vec<u8> {
    let attributes = std::mem::take(&mut node.attribute);
    let mut buf = node.encode_to_vec();
    for attribute in attributes {
        put_message(&mut buf, 5, &encode_attribute(attribute));
    }
    buf
}

fn encode_attribute(mut attribute: pb::AttributeProto) -> Vec<u8> {
    use pb::attribute_proto::AttributeType as T;
    use prost::encoding::{encode_key, encode_varint, WireType};
    let graph = attribute.g.take();
    let graphs = std::mem::take(&mut attribute.graphs);
    let mut buf = attribute.encode_to_vec();
    if attribute.r#type == T::Int as i32 && attribute.i == 0 {
        encode_key(3, WireType::Varint, &mut buf);
        encode_varint(0, &mut buf);
    }
    if attribute.r#type == T::Float as i32 && attribute.f == 0.0 {
        encode_key(2, WireType::ThirtyTwoBit, &mut buf);
        buf.extend_from_slice(&attribute.f.to_le_bytes());
    }
    if let Some(graph) = graph {
        put_message(&mut buf, 6, &encode_graph(graph));
    }
    for graph in graphs {
        put_message(&mut buf, 11, &encode_graph(graph));
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fingerprints computed by examples/train_onnxruntime.py's numpy `content_hash`, on the bytes
    /// (i * 37 + 11) % 256: whole words, a partial last word, and nothing.
    #[test]
    fn content_hash_matches_the_trainers() {
        let bytes = |n: usize| {
            (0..n)
                .map(|i| ((i * 37 + 11) % 256) as u8)
                .collect::<Vec<u8>>()
        };
        for (n, want) in [
            (0, "0000000000000000-0"),
            (5, "13b8d6bea47044e7-5"),
            (8, "2fd5eabea47044e7-8"),
            (13, "b68c856f551a5f87-13"),
            (64, "2265efde70adb578-64"),
        ] {
            assert_eq!(content_hash(&bytes(n)), want, "{n} bytes");
        }
    }

    fn model_with_weight(values: usize) -> pb::ModelProto {
        let weight = pb::TensorProto {
            name: "w".into(),
            dims: vec![values as i64],
            data_type: pb::tensor_proto::DataType::Float as i32,
            raw_data: (0..values)
                .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
                .collect(),
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(pb::GraphProto {
                node: vec![pb::NodeProto {
                    op_type: "Identity".into(),
                    input: vec!["w".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                initializer: vec![weight],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// An INT or FLOAT attribute of value 0 keeps its value field (ONNX Runtime reads an
    /// attribute without it as absent), inside subgraphs too.
    #[test]
    fn zero_attributes_keep_their_value() {
        use pb::attribute_proto::AttributeType as T;
        let zero_int = pb::AttributeProto {
            name: "keepdims".into(),
            r#type: T::Int as i32,
            ..Default::default()
        };
        let zero_float = pb::AttributeProto {
            name: "low".into(),
            r#type: T::Float as i32,
            ..Default::default()
        };
        let bytes = encode_attribute(zero_int.clone());
        assert!(bytes.windows(2).any(|w| w == [0x18, 0x00]), "{bytes:?}"); // field 3, varint 0
        let bytes = encode_attribute(zero_float);
        assert!(
            bytes.windows(5).any(|w| w == [0x15, 0, 0, 0, 0]),
            "{bytes:?}"
        ); // field 2, 0.0f32
           // A whole model: the bytes decode back to the same model, and carry the zero.
        let mut model = model_with_weight(4);
        let graph = model.graph.as_mut().unwrap();
        graph.node[0].attribute.push(zero_int.clone());
        let inner = pb::GraphProto {
            node: vec![graph.node[0].clone()],
            ..Default::default()
        };
        graph.node[0].attribute.push(pb::AttributeProto {
            name: "body".into(),
            r#type: T::Graph as i32,
            g: Some(inner),
            ..Default::default()
        });
        let bytes = encode_keeping_zero_attributes(model.clone());
        assert_eq!(pb::ModelProto::decode(bytes.as_slice()).unwrap(), model);
        let plain = model.encode_to_vec();
        assert_eq!(
            bytes.len(),
            plain.len() + 2 * 2,
            "one 2-byte field per zero attribute"
        );
    }

    /// Past the limit, large weights move to `<file>.data`, and the pair loads back the same.
    #[test]
    fn past_the_limit_weights_go_to_external_data() {
        let dir = std::env::temp_dir().join(format!("kdgraph-io-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("joint.onnx");
        let model = model_with_weight(2048);
        let files = encode_within(model.clone(), &path, 4096).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].0, dir.join("joint.onnx.data"));
        assert!(
            files[0].1.len() < 4096,
            "the graph itself stays under the limit"
        );
        for (file, bytes) in &files {
            fs::write(file, bytes).unwrap();
        }
        let loaded = load_model(&path).unwrap();
        let original = &model.graph.as_ref().unwrap().initializer[0];
        let back = &loaded.graph().initializer[0];
        assert_eq!(proto::float_values(back), proto::float_values(original));
        // Under the limit: one file.
        assert_eq!(
            encode_within(model.clone(), &path, 1 << 20).unwrap().len(),
            1
        );
        // A graph that cannot get under the limit even so is refused.
        let refused = encode_within(model, &path, 16).unwrap_err();
        assert!(
            refused.message().contains("2 GB protobuf limit"),
            "{refused}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
