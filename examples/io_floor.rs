//! The I/O floor of a merge: read, decode, encode and write two ONNX models with prost and nothing
//! else. `bench/bench.py` compares `kdgraph merge` against it. With `--durable` each file is
//! written as merge writes its outputs: to a temporary file, synced to disk, then renamed into
//! place, and the folder synced.

use std::io::Write;
use std::time::Instant;

use prost::Message;
use tract_onnx::pb::ModelProto;

fn write_durably(path: &str, bytes: &[u8]) -> std::io::Result<()> {
    let temp = format!("{path}.tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let durable = args.iter().any(|a| a == "--durable");
    let paths: Vec<&String> = args.iter().filter(|a| *a != "--durable").collect();
    let [teacher, student, out_dir] = paths.as_slice() else {
        eprintln!("usage: io_floor [--durable] TEACHER STUDENT OUT_DIR");
        std::process::exit(2);
    };
    let start = Instant::now();
    for (i, path) in [teacher, student].into_iter().enumerate() {
        let bytes = std::fs::read(path).expect("read the model");
        let model = ModelProto::decode(bytes.as_slice()).expect("decode the model");
        let encoded = model.encode_to_vec();
        let out = format!("{out_dir}/floor{i}.onnx");
        if durable {
            write_durably(&out, &encoded).expect("write the model");
        } else {
            std::fs::write(out, encoded).expect("write the model");
        }
    }
    if durable {
        let dir = std::fs::File::open(out_dir.as_str()).expect("open the output folder");
        dir.sync_all().expect("sync the output folder");
    }
    println!("{:.4}", start.elapsed().as_secs_f64());
}
