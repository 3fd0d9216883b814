//! Named arrays in numpy's .npz format, read into and written from tract tensors (float32,
//! float64, int64, int32 and bool), for the commands that run graphs on a user's data.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use ndarray_npy::{NpzReader, NpzWriter};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::{ArrayD, IxDyn, OwnedRepr};

use crate::error::{Error, Result};

/// Every array of an .npz file, in the file's order, by name (without numpy's `.npy` suffix).
pub fn read_npz(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let shown = path.display();
    let file = File::open(path).map_err(|e| Error::io(format!("cannot read `{shown}`: {e}")))?;
    let mut npz = NpzReader::new(BufReader::new(file))
        .map_err(|e| Error::invalid_model(format!("`{shown}` is not an .npz file: {e}")))?;
    let names = npz
        .names()
        .map_err(|e| Error::invalid_model(format!("`{shown}`: cannot list its arrays: {e}")))?;
    let mut arrays = Vec::with_capacity(names.len());
    for name in names {
        let tensor = read_one(&mut npz, &name).ok_or_else(|| {
            Error::unsupported(format!(
                "`{shown}`: array `{name}` is not float32, float64, int64, int32 or bool (or is stored in Fortran order); save it with numpy as one of those"
            ))
        })?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        arrays.push((key, tensor));
    }
    Ok(arrays)
}

fn read_one(npz: &mut NpzReader<BufReader<File>>, name: &str) -> Option<Tensor> {
    macro_rules! try_type {
        ($t:ty) => {
            if let Ok(a) = npz.by_name::<OwnedRepr<$t>, IxDyn>(name) {
                return Some(a.into_tensor());
            }
        };
    }
    try_type!(f32);
    try_type!(i64);
    try_type!(f64);
    try_type!(i32);
    try_type!(bool);
    None
}

/// Writes `arrays` to `path` as an uncompressed .npz (float32, float64, int64, int32, bool).
pub fn write_npz(path: &Path, arrays: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut npz = NpzWriter::new(std::io::Cursor::new(&mut bytes));
        for (name, tensor) in arrays {
            let fail = |e: &dyn std::fmt::Display| {
                Error::io(format!(
                    "cannot write array `{name}` to `{}`: {e}",
                    path.display()
                ))
            };
            let written = match tensor.datum_type() {
                DatumType::F32 => npz.add_array(name.as_str(), &view::<f32>(tensor)?),
                DatumType::F64 => npz.add_array(name.as_str(), &view::<f64>(tensor)?),
                DatumType::I64 => npz.add_array(name.as_str(), &view::<i64>(tensor)?),
                DatumType::I32 => npz.add_array(name.as_str(), &view::<i32>(tensor)?),
                DatumType::Bool => npz.add_array(name.as_str(), &view::<bool>(tensor)?),
                other => {
                    return Err(Error::unsupported(format!(
                        "output `{name}` is {other:?}; .npz output supports float32, float64, int64, int32 and bool"
                    )))
                }
            };
            written.map_err(|e| fail(&e))?;
        }
        npz.finish()
            .map_err(|e| Error::io(format!("cannot write `{}`: {e}", path.display())))?;
    }
    Ok(bytes)
}

fn view<T: Datum + Clone>(tensor: &Tensor) -> Result<ArrayD<T>> {
    tensor
        .to_plain_array_view::<T>()
        .map(|v| v.to_owned())
        .map_err(|e| Error::invalid_model(format!("cannot read a tensor: {e}")))
}
