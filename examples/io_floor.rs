//! The I/O floor of a merge: read, decode, encode and write two ONNX models with prost and nothing
//! else. `bench/bench.py` compares `kdgraph merge` against it.

use std::time::Instant;

use prost::Message;
use tract_onnx::pb::ModelProto;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [teacher, student, out_dir] = args.as_slice() else {
        eprintln!("usage: io_floor TEACHER STUDENT OUT_DIR");
        std::process::exit(2);
    };
    let start = Instant::now();
    for (i, path) in [teacher, student].into_iter().enumerate() {
        let bytes = std::fs::read(path).expect("read the model");
        let model = ModelProto::decode(bytes.as_slice()).expect("decode the model");
        let encoded = model.encode_to_vec();
        std::fs::write(format!("{out_dir}/floor{i}.onnx"), encoded).expect("write the model");
    }
    println!("{:.4}", start.elapsed().as_secs_f64());
}
