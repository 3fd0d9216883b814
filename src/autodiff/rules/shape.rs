//! Rules for operators that move, select or copy elements: reshapes, transposes, concatenation and
//! splitting, slicing, gathers, expansion, tiling, padding, TopK, depth/space rearrangements.

use super::Rule;
use crate::analysis::shapes::Dim;
use crate::autodiff::context::{Ctx, NodeView};
use crate::error::{Error, Result};
use crate::onnx::builder::Attr;
use crate::onnx::pb::tensor_proto::DataType;

pub const RULES: &[(&str, Rule)] = &[
    ("Reshape", to_input_shape),
    ("Flatten", to_input_shape),
    ("Squeeze", to_input_shape),
    ("Unsqueeze", to_input_shape),
    ("Transpose", transpose),
    ("Concat", concat),
    ("Split", split),
    ("Slice", slice),
    ("Gather", gather),
    ("GatherElements", gather_elements),
    ("Expand", expand),
    ("Tile", tile),
    ("Pad", pad),
    ("TopK", top_k),
    ("DepthToSpace", depth_to_space),
    ("SpaceToDepth", space_to_depth),
];

type Adjoints = Result<Vec<Option<String>>>;

/// d reshape, flatten, squeeze, unsqueeze: dy reshaped to the input's shape.
fn to_input_shape(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("a reshape has one output");
    let shape = shape_tensor(ctx, n.input(0), &n.name("shape"));
    Ok(vec![Some(ctx.op(
        "Reshape",
        &[dy, &shape],
        vec![],
        &n.name("dx"),
    ))])
}

/// d transpose: dy transposed by the inverse permutation (the default one reverses the axes).
fn transpose(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Transpose has one output");
    let rank = ctx.rank(n.input(0))?;
    let perm = n
        .attr_ints("perm")
        .unwrap_or_else(|| (0..rank as i64).rev().collect());
    let inverse = inverse_permutation(&perm, rank)?;
    Ok(vec![Some(ctx.b.transpose(dy, &inverse, &n.name("dx")))])
}

/// d concat: dy split along the axis into pieces the sizes of the inputs.
fn concat(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Concat has one output");
    let axis = normalize_axis(n.attr_int("axis", 0), ctx.rank(n.output(0))?)?;
    let inputs = &n.node.input;
    let sizes = inputs
        .iter()
        .map(|x| dim_of(ctx, x, axis))
        .collect::<Result<Vec<_>>>()?;
    let sizes = dims_tensor(ctx, &sizes, &n.name("sizes"));
    let pieces: Vec<String> = (0..inputs.len())
        .map(|i| ctx.b.unique(&n.name(&format!("dx{i}"))))
        .collect();
    let outputs: Vec<&str> = pieces.iter().map(String::as_str).collect();
    let name = ctx.b.unique(&n.name("split"));
    ctx.b.node(
        "Split",
        &[dy, &sizes],
        &outputs,
        vec![("axis", Attr::Int(axis as i64))],
        &name,
    );
    Ok(pieces
        .into_iter()
        .zip(n.needs)
        .map(|(piece, &need)| need.then_some(piece))
        .collect())
}

/// d split: the outputs' adjoints concatenated along the axis, with zeros for the outputs the
/// loss does not read.
fn split(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let mut pieces = Vec::new();
    for (i, (y, d)) in n.node.output.iter().zip(dy).enumerate() {
        pieces.push(match d {
            Some(d) => d.clone(),
            None => zeros_like(ctx, y, &n.name(&format!("zeros{i}"))),
        });
    }
    let inputs: Vec<&str> = pieces.iter().map(String::as_str).collect();
    let axis = ("axis", Attr::Int(n.attr_int("axis", 0)));
    Ok(vec![Some(ctx.op(
        "Concat",
        &inputs,
        vec![axis],
        &n.name("dx"),
    ))])
}

/// d slice: dy placed back at the positions the slice read, one sliced axis at a time, zeros
/// elsewhere (constant starts, ends, axes and steps; the sliced axes must have fixed sizes).
fn slice(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Slice has one output");
    let x = n.input(0);
    let rank = ctx.rank(x)?;
    let starts = constant_input(ctx, n, 1, "starts")?;
    let ends = constant_input(ctx, n, 2, "ends")?;
    let count = starts.len() as i64;
    let axes = optional_constant_input(ctx, n, 3, "axes")?.unwrap_or_else(|| (0..count).collect());
    let steps =
        optional_constant_input(ctx, n, 4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
    if [ends.len(), axes.len(), steps.len()] != [starts.len(); 3] {
        return Err(Error::unsupported(
            "its starts, ends, axes and steps differ in length",
        ));
    }
    let mut grad = dy.to_string();
    for i in 0..starts.len() {
        let axis = normalize_axis(axes[i], rank)?;
        let name = n.name(&format!("axis{axis}"));
        if let Some((before, after)) = open_run(ctx, x, axis, starts[i], ends[i], steps[i]) {
            grad = pad_axis(ctx, &grad, axis, rank, before, after, &name);
            continue;
        }
        let dim = fixed_dim(ctx, x, axis)?;
        let positions = slice_positions(starts[i], ends[i], steps[i], dim)?;
        grad = place_along_axis(ctx, &grad, axis, rank, &positions, dim, &name);
    }
    Ok(vec![Some(grad)])
}

/// Along an axis of unknown size (the batch), a step-1 slice from a position counted from the
/// front to the end or to a position counted from the back: the zeros its adjoint needs before
/// and after, which do not depend on the size (`x[1:]`, `x[:-1]`).
fn open_run(
    ctx: &Ctx,
    x: &str,
    axis: usize,
    start: i64,
    end: i64,
    step: i64,
) -> Option<(i64, i64)> {
    let symbolic = matches!(ctx.shape(x).ok()?.get(axis), Some(Dim::Symbol(_)));
    let to_the_end = end >= i64::from(i32::MAX);
    (symbolic && step == 1 && start >= 0 && (end < 0 || to_the_end))
        .then(|| (start, if to_the_end { 0 } else { -end }))
}

/// The positions along one axis that Slice reads, in output order (ONNX's clamping rules).
fn slice_positions(start: i64, end: i64, step: i64, dim: i64) -> Result<Vec<i64>> {
    if step == 0 {
        return Err(Error::unsupported("a Slice step is 0"));
    }
    if dim == 0 {
        return Ok(Vec::new());
    }
    let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
    let (start, end) = if step > 0 {
        (wrap(start).clamp(0, dim), wrap(end).clamp(0, dim))
    } else {
        (wrap(start).clamp(0, dim - 1), wrap(end).clamp(-1, dim - 1))
    };
    let mut positions = Vec::new();
    let mut p = start;
    while (step > 0 && p < end) || (step < 0 && p > end) {
        positions.push(p);
        p = p.saturating_add(step);
    }
    Ok(positions)
}

/// A tensor whose index `positions[k]` along `axis` holds slice k of `grad` and whose other
/// indices hold zeros (`positions` distinct): a Pad when they are one ascending run, else a
/// Gather through the inverse map from `grad` with one zero slice appended, which the positions
/// no slice lands on read.
fn place_along_axis(
    ctx: &mut Ctx,
    grad: &str,
    axis: usize,
    rank: usize,
    positions: &[i64],
    dim: i64,
    name: &str,
) -> String {
    let count = positions.len() as i64;
    if positions.windows(2).all(|w| w[1] == w[0] + 1) {
        let before = positions.first().copied().unwrap_or(0);
        return pad_axis(ctx, grad, axis, rank, before, dim - before - count, name);
    }
    let padded = pad_axis(ctx, grad, axis, rank, 0, 1, &format!("{name}/zero_slot"));
    let mut inverse = vec![count; dim as usize];
    for (k, &p) in positions.iter().enumerate() {
        inverse[p as usize] = k as i64;
    }
    let inverse = ctx
        .b
        .const_i64(&format!("{name}/inverse"), &[dim], &inverse);
    ctx.op(
        "Gather",
        &[&padded, &inverse],
        vec![("axis", Attr::Int(axis as i64))],
        name,
    )
}

/// `x` with `before` and `after` zero slices added along `axis` (itself when both are 0).
fn pad_axis(
    ctx: &mut Ctx,
    x: &str,
    axis: usize,
    rank: usize,
    before: i64,
    after: i64,
    name: &str,
) -> String {
    if before == 0 && after == 0 {
        return x.to_string();
    }
    let mut pads = vec![0; 2 * rank];
    pads[axis] = before;
    pads[rank + axis] = after;
    let pads = ctx
        .b
        .const_i64(&format!("{name}/pads"), &[2 * rank as i64], &pads);
    ctx.op("Pad", &[x, &pads], vec![], name)
}

/// d gather: dy, its index dims flattened into one at the axis, added back at the gathered
/// positions of a zero tensor, so repeated indices accumulate. From opset 16 a ScatterElements
/// with reduction "add" (indices broadcast over dy; onnxruntime and tract 0.23 run it); before,
/// a MatMul with the one-hot matrix [indices, size along the axis].
fn gather(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Gather has one output");
    let (data, indices) = (n.input(0), n.input(1));
    let rank = ctx.rank(data)?;
    let axis = normalize_axis(n.attr_int("axis", 0), rank)?;
    let updates = if ctx.rank(indices)? == 1 {
        dy.to_string()
    } else {
        flatten_index_dims(ctx, n, dy, data, axis, rank)?
    };
    let dx = if ctx.opset() >= 16 {
        let mut along = vec![1; rank];
        along[axis] = -1;
        let lined_up = ctx.b.reshape(indices, &along, &n.name("indices"));
        let shape = ctx.b.unary("Shape", &updates, &n.name("updates_shape"));
        let spread = ctx.op("Expand", &[&lined_up, &shape], vec![], &n.name("spread"));
        scatter_add(ctx, n, data, &spread, &updates, axis)
    } else {
        let flat = ctx.b.reshape(indices, &[-1], &n.name("flat_indices"));
        gather_by_one_hot(ctx, n, &updates, &flat, data, axis, rank)?
    };
    Ok(vec![Some(dx)])
}

/// Gather's dy reshaped from data[..axis] + indices + data[axis+1..] to the rank of the data,
/// with every index dim in one at `axis`.
fn flatten_index_dims(
    ctx: &mut Ctx,
    n: &NodeView,
    dy: &str,
    data: &str,
    axis: usize,
    rank: usize,
) -> Result<String> {
    let parts = (0..rank)
        .map(|a| {
            if a == axis {
                Ok(Part::Known(-1))
            } else {
                dim_of(ctx, data, a)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let shape = dims_tensor(ctx, &parts, &n.name("updates_shape"));
    Ok(ctx.op("Reshape", &[dy, &shape], vec![], &n.name("updates")))
}

/// Before opset 16: `updates` contracted along `axis` with the one-hot matrix of `flat_indices`
/// (a MatMul, after moving the axis last), which sums the slices of repeated indices.
fn gather_by_one_hot(
    ctx: &mut Ctx,
    n: &NodeView,
    updates: &str,
    flat_indices: &str,
    data: &str,
    axis: usize,
    rank: usize,
) -> Result<String> {
    let one_hot = one_hot(ctx, n, flat_indices, data, axis, 1, 2)?;
    if axis == rank - 1 {
        return Ok(ctx.b.matmul(updates, &one_hot, &n.name("dx")));
    }
    let perm: Vec<i64> = (0..rank as i64)
        .filter(|&a| a != axis as i64)
        .chain([axis as i64])
        .collect();
    let moved = ctx.b.transpose(updates, &perm, &n.name("axis_last"));
    let product = ctx.b.matmul(&moved, &one_hot, &n.name("scattered"));
    let back = inverse_permutation(&perm, rank)?;
    Ok(ctx.b.transpose(&product, &back, &n.name("dx")))
}

/// A mask in the element type of `data`: `indices` (negative ones wrapped) with a new axis at
/// `at`, compared with the positions 0..size of `data` along `axis` (which must be fixed) laid
/// along that new axis of a rank-`rank` tensor; 1 where they are equal.
fn one_hot(
    ctx: &mut Ctx,
    n: &NodeView,
    indices: &str,
    data: &str,
    axis: usize,
    at: usize,
    rank: usize,
) -> Result<String> {
    let dim = fixed_dim(ctx, data, axis)?;
    let long = ctx.op(
        "Cast",
        &[indices],
        vec![("to", Attr::Int(DataType::Int64 as i64))],
        &n.name("indices_i64"),
    );
    let zero = ctx.b.const_i64(&n.name("zero_index"), &[], &[0]);
    let size = ctx.b.const_i64(&n.name("size"), &[], &[dim]);
    let negative = ctx.b.binary("Less", &long, &zero, &n.name("negative"));
    let shifted = ctx.b.add(&long, &size, &n.name("shifted"));
    let wrapped = ctx.op(
        "Where",
        &[&negative, &shifted, &long],
        vec![],
        &n.name("wrapped"),
    );
    let lifted = ctx
        .b
        .unsqueeze(&wrapped, &[at as i64], &n.name("indices_lifted"));
    let mut dims = vec![1; rank];
    dims[at] = dim;
    let positions: Vec<i64> = (0..dim).collect();
    let positions = ctx.b.const_i64(&n.name("positions"), &dims, &positions);
    let equal = ctx.b.binary("Equal", &lifted, &positions, &n.name("equal"));
    let to = ctx.elem_type(data).unwrap_or(DataType::Float as i32);
    Ok(ctx.op(
        "Cast",
        &[&equal],
        vec![("to", Attr::Int(to as i64))],
        &n.name("one_hot"),
    ))
}

/// Zeros shaped like `data` with `updates` added at `indices` along `axis` (ScatterElements with
/// reduction "add", opset 16), so repeated indices accumulate.
fn scatter_add(
    ctx: &mut Ctx,
    n: &NodeView,
    data: &str,
    indices: &str,
    updates: &str,
    axis: usize,
) -> String {
    let zeros = zeros_like(ctx, data, &n.name("zeros"));
    ctx.op_with_strings(
        "ScatterElements",
        &[&zeros, indices, updates],
        vec![("axis", Attr::Int(axis as i64))],
        &[("reduction", "add")],
        &n.name("dx"),
    )
}

/// d gather_elements: dy added back at the gathered positions along the axis, so repeated indices
/// accumulate. From opset 16 a ScatterElements with reduction "add" (onnxruntime and tract 0.23
/// run it); before, dy times the one-hot mask [.., indices, size, ..] summed over the indices
/// (then padded to the data's shape where the indices are smaller).
fn gather_elements(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("GatherElements has one output");
    let (data, indices) = (n.input(0), n.input(1));
    let rank = ctx.rank(data)?;
    let axis = normalize_axis(n.attr_int("axis", 0), rank)?;
    if ctx.opset() >= 16 {
        return Ok(vec![Some(scatter_add(ctx, n, data, indices, dy, axis))]);
    }
    let mask = one_hot(ctx, n, indices, data, axis, axis + 1, rank + 1)?;
    let lifted = ctx
        .b
        .unsqueeze(dy, &[axis as i64 + 1], &n.name("dy_lifted"));
    let product = ctx.b.mul(&mask, &lifted, &n.name("spread"));
    let axes = ctx.b.const_i64(&n.name("axes"), &[1], &[axis as i64]);
    let summed = ctx.op(
        "ReduceSum",
        &[&product, &axes],
        vec![("keepdims", Attr::Int(0))],
        &n.name("summed"),
    );
    Ok(vec![Some(pad_to_data(
        ctx, n, &summed, indices, data, axis,
    )?)])
}

/// `grad` (shaped like `indices` with the data's size along `axis`) padded with zeros at the end
/// of the axes where the indices are smaller than the data.
fn pad_to_data(
    ctx: &mut Ctx,
    n: &NodeView,
    grad: &str,
    indices: &str,
    data: &str,
    axis: usize,
) -> Result<String> {
    let (shown, full) = (ctx.shape(indices)?.clone(), ctx.shape(data)?.clone());
    let rank = full.len();
    let mut pads = vec![0; 2 * rank];
    for (a, pair) in shown
        .iter()
        .zip(&full)
        .enumerate()
        .filter(|(a, _)| *a != axis)
    {
        if let (Dim::Fixed(i), Dim::Fixed(d)) = pair {
            pads[rank + a] = d - i;
        }
    }
    if pads.iter().all(|&p| p == 0) {
        return Ok(grad.to_string());
    }
    let pads = ctx
        .b
        .const_i64(&n.name("to_data_pads"), &[2 * rank as i64], &pads);
    Ok(ctx.op("Pad", &[grad, &pads], vec![], &n.name("dx")))
}

/// d expand: dy summed over the axes the expansion added or stretched.
fn expand(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Expand has one output");
    Ok(vec![Some(ctx.unbroadcast(dy, n.input(0), n.output(0))?)])
}

/// d tile: dy with each tiled axis split into (repeats, size) and summed over the repeats
/// (constant repeats).
fn tile(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Tile has one output");
    let x = n.input(0);
    let repeats = constant_input(ctx, n, 1, "repeats")?;
    if repeats.len() != ctx.rank(x)? {
        return Err(Error::unsupported(
            "its repeats do not match the input's rank",
        ));
    }
    let mut parts = Vec::new();
    let mut repeat_axes = Vec::new();
    for (axis, &times) in repeats.iter().enumerate() {
        if times != 1 {
            repeat_axes.push(parts.len() as i64);
            parts.push(Part::Known(times));
        }
        parts.push(dim_of(ctx, x, axis)?);
    }
    if repeat_axes.is_empty() {
        return Ok(vec![Some(dy.to_string())]);
    }
    let split_shape = dims_tensor(ctx, &parts, &n.name("split_shape"));
    let split = ctx.op("Reshape", &[dy, &split_shape], vec![], &n.name("split"));
    let summed = ctx.b.reduce_sum(&split, &repeat_axes, &n.name("summed"));
    let shape = shape_tensor(ctx, x, &n.name("shape"));
    Ok(vec![Some(ctx.op(
        "Reshape",
        &[&summed, &shape],
        vec![],
        &n.name("dx"),
    ))])
}

/// d pad (constant mode): dy cropped where the forward pass padded and padded with zeros where it
/// cropped (negative pads); the constant value gets the sum of dy over the padding.
fn pad(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Pad has one output");
    let mode = n.attr_string("mode").unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return Err(Error::unsupported(format!(
            "kdgraph differentiates constant-mode Pad only, not `{mode}`"
        )));
    }
    let rank = ctx.rank(n.input(0))?;
    let (before, after) = pad_amounts(ctx, n, rank)?;
    let inner = crop_padding(ctx, n, dy, &before, &after);
    let mut out = vec![None; 3];
    if n.needs(0) {
        out[0] = Some(restore_cropped(ctx, n, &inner, &before, &after));
    }
    if n.needs(2) {
        let total = ctx.b.sum_all(dy, &n.name("total"));
        let kept = ctx.b.sum_all(&inner, &n.name("kept"));
        let padding = ctx.b.sub(&total, &kept, &n.name("padding"));
        let shape = shape_tensor(ctx, n.input(2), &n.name("value_shape"));
        out[2] = Some(ctx.op("Reshape", &[&padding, &shape], vec![], &n.name("dvalue")));
    }
    Ok(out)
}

/// Pad's amounts per axis, (before, after), from its constant pads (and axes, from opset 18).
fn pad_amounts(ctx: &Ctx, n: &NodeView, rank: usize) -> Result<(Vec<i64>, Vec<i64>)> {
    let pads = constant_input(ctx, n, 1, "pads")?;
    let axes = match optional_constant_input(ctx, n, 3, "axes")? {
        Some(axes) => axes
            .iter()
            .map(|&a| normalize_axis(a, rank))
            .collect::<Result<Vec<_>>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(Error::unsupported("its pads are not two per padded axis"));
    }
    let (mut before, mut after) = (vec![0; rank], vec![0; rank]);
    for (i, &axis) in axes.iter().enumerate() {
        before[axis] = pads[i];
        after[axis] = pads[axes.len() + i];
    }
    Ok((before, after))
}

/// dy without the slices the forward pass added (positive pads).
fn crop_padding(ctx: &mut Ctx, n: &NodeView, dy: &str, before: &[i64], after: &[i64]) -> String {
    let axes: Vec<usize> = (0..before.len())
        .filter(|&a| before[a] > 0 || after[a] > 0)
        .collect();
    if axes.is_empty() {
        return dy.to_string();
    }
    let starts: Vec<i64> = axes.iter().map(|&a| before[a].max(0)).collect();
    let ends: Vec<i64> = axes
        .iter()
        .map(|&a| if after[a] > 0 { -after[a] } else { i64::MAX })
        .collect();
    let axes: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
    let len = [axes.len() as i64];
    let starts = ctx.b.const_i64(&n.name("crop_starts"), &len, &starts);
    let ends = ctx.b.const_i64(&n.name("crop_ends"), &len, &ends);
    let axes = ctx.b.const_i64(&n.name("crop_axes"), &len, &axes);
    ctx.op(
        "Slice",
        &[dy, &starts, &ends, &axes],
        vec![],
        &n.name("inner"),
    )
}

/// `x` with zero slices where the forward pass removed some (negative pads).
fn restore_cropped(ctx: &mut Ctx, n: &NodeView, x: &str, before: &[i64], after: &[i64]) -> String {
    let pads: Vec<i64> = before
        .iter()
        .chain(after)
        .map(|&p| p.saturating_neg().max(0))
        .collect();
    if pads.iter().all(|&p| p == 0) {
        return x.to_string();
    }
    let pads = ctx
        .b
        .const_i64(&n.name("restore_pads"), &[pads.len() as i64], &pads);
    ctx.op("Pad", &[x, &pads], vec![], &n.name("dx"))
}

/// d top_k: the values' adjoint written back at the chosen indices of a zero tensor
/// (ScatterElements without reduction, opset 11: the indices of one row are distinct, so nothing
/// accumulates).
fn top_k(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let Some(dvalues) = dy[0].as_deref() else {
        return Ok(vec![]);
    };
    if n.output(1).is_empty() {
        return Err(Error::unsupported("its indices output is unnamed"));
    }
    let x = n.input(0);
    let axis = normalize_axis(n.attr_int("axis", -1), ctx.rank(x)?)?;
    let zeros = zeros_like(ctx, x, &n.name("zeros"));
    Ok(vec![Some(ctx.op(
        "ScatterElements",
        &[&zeros, n.output(1), dvalues],
        vec![("axis", Attr::Int(axis as i64))],
        &n.name("dx"),
    ))])
}

/// d depth_to_space: in DCR mode SpaceToDepth of dy (its inverse); in CRD mode the forward
/// reshape, transpose, reshape undone.
fn depth_to_space(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("DepthToSpace has one output");
    let block = block_size(n)?;
    let mode = n.attr_string("mode").unwrap_or_else(|| "DCR".into());
    let dx = match mode.as_str() {
        "DCR" => ctx.op(
            "SpaceToDepth",
            &[dy],
            vec![("blocksize", Attr::Int(block))],
            &n.name("dx"),
        ),
        "CRD" => undo_crd(ctx, n, dy, block)?,
        other => {
            return Err(Error::unsupported(format!(
                "DepthToSpace mode `{other}` is unknown"
            )))
        }
    };
    Ok(vec![Some(dx)])
}

/// The inverse of DepthToSpace in CRD mode: dy [N, C, H*b, W*b] as [N, C, H, b, W, b], transposed
/// to [N, C, b, b, H, W], reshaped to the input's [N, C*b*b, H, W].
fn undo_crd(ctx: &mut Ctx, n: &NodeView, dy: &str, block: i64) -> Result<String> {
    let (x, y) = (n.input(0), n.output(0));
    if ctx.rank(x)? != 4 {
        return Err(Error::unsupported("its input is not 4-D"));
    }
    let parts = [
        dim_of(ctx, x, 0)?,
        dim_of(ctx, y, 1)?,
        dim_of(ctx, x, 2)?,
        Part::Known(block),
        dim_of(ctx, x, 3)?,
        Part::Known(block),
    ];
    let blocks_shape = dims_tensor(ctx, &parts, &n.name("blocks_shape"));
    let blocks = ctx.op("Reshape", &[dy, &blocks_shape], vec![], &n.name("blocks"));
    let moved = ctx
        .b
        .transpose(&blocks, &[0, 1, 3, 5, 2, 4], &n.name("moved"));
    let shape = shape_tensor(ctx, x, &n.name("shape"));
    Ok(ctx.op("Reshape", &[&moved, &shape], vec![], &n.name("dx")))
}

/// d space_to_depth: DepthToSpace of dy in DCR mode, its inverse.
fn space_to_depth(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("SpaceToDepth has one output");
    let block = block_size(n)?;
    Ok(vec![Some(ctx.op(
        "DepthToSpace",
        &[dy],
        vec![("blocksize", Attr::Int(block))],
        &n.name("dx"),
    ))])
}

/// The `blocksize` of DepthToSpace and SpaceToDepth.
fn block_size(n: &NodeView) -> Result<i64> {
    match n.attr_int("blocksize", 0) {
        block if block > 0 => Ok(block),
        _ => Err(Error::unsupported(
            "its blocksize is missing or not positive",
        )),
    }
}

/// One dim of a shape being built: a known size, or dim `axis` of a forward tensor (read at run
/// time with Shape).
enum Part<'t> {
    Known(i64),
    DimOf(&'t str, usize),
}

/// Dim `axis` of `tensor` as a [`Part`]: known when fixed.
fn dim_of<'t>(ctx: &Ctx, tensor: &'t str, axis: usize) -> Result<Part<'t>> {
    match ctx.shape(tensor)?.get(axis) {
        Some(Dim::Fixed(d)) => Ok(Part::Known(*d)),
        Some(Dim::Symbol(_)) => Ok(Part::DimOf(tensor, axis)),
        None => Err(Error::unsupported(format!("`{tensor}` has no axis {axis}"))),
    }
}

/// A 1-D int64 shape of `parts`: a constant when all are known, else a Concat of constants and
/// dims read with Shape.
fn dims_tensor(ctx: &mut Ctx, parts: &[Part], name: &str) -> String {
    let known: Option<Vec<i64>> = parts
        .iter()
        .map(|p| match p {
            Part::Known(d) => Some(*d),
            Part::DimOf(..) => None,
        })
        .collect();
    if let Some(dims) = known {
        return ctx.b.const_i64(name, &[dims.len() as i64], &dims);
    }
    let pieces: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| match part {
            Part::Known(d) => ctx.b.const_i64(&format!("{name}/{i}"), &[1], &[*d]),
            Part::DimOf(tensor, axis) => {
                let shape = ctx.b.unary("Shape", tensor, &format!("{name}/{i}/shape"));
                let axis = *axis as i64;
                ctx.b
                    .slice(&shape, 0, axis, axis + 1, &format!("{name}/{i}"))
            }
        })
        .collect();
    let inputs: Vec<&str> = pieces.iter().map(String::as_str).collect();
    ctx.op("Concat", &inputs, vec![("axis", Attr::Int(0))], name)
}

/// The shape of a forward tensor as an int64 tensor: a constant when fixed, else Shape.
fn shape_tensor(ctx: &mut Ctx, tensor: &str, name: &str) -> String {
    match ctx.fixed_dims(tensor) {
        Ok(dims) => ctx.b.const_i64(name, &[dims.len() as i64], &dims),
        Err(_) => ctx.b.unary("Shape", tensor, name),
    }
}

/// Float zeros shaped like a forward tensor.
fn zeros_like(ctx: &mut Ctx, tensor: &str, name: &str) -> String {
    let shape = shape_tensor(ctx, tensor, &format!("{name}/shape"));
    let zero = ctx.b.scalar(&format!("{name}/zero"), 0.0);
    ctx.op("Expand", &[&zero, &shape], vec![], name)
}

/// The size of `tensor` along `axis`, which must be fixed.
fn fixed_dim(ctx: &Ctx, tensor: &str, axis: usize) -> Result<i64> {
    match ctx.shape(tensor)?.get(axis) {
        Some(Dim::Fixed(d)) => Ok(*d),
        _ => Err(Error::unsupported(format!(
            "the size of `{tensor}` along axis {axis} must be fixed here; give the model fixed input shapes"
        ))),
    }
}

/// `axis` counted from the front of a rank-`rank` tensor.
fn normalize_axis(axis: i64, rank: usize) -> Result<usize> {
    let rank = rank as i64;
    let from_front = if axis < 0 { axis + rank } else { axis };
    if (0..rank).contains(&from_front) {
        Ok(from_front as usize)
    } else {
        Err(Error::unsupported(format!(
            "axis {axis} is out of range for rank {rank}"
        )))
    }
}

/// The permutation that undoes `perm`.
fn inverse_permutation(perm: &[i64], rank: usize) -> Result<Vec<i64>> {
    let invalid = || Error::unsupported(format!("{perm:?} is not a permutation of {rank} axes"));
    if perm.len() != rank {
        return Err(invalid());
    }
    let mut inverse = vec![-1; rank];
    for (i, &p) in perm.iter().enumerate() {
        let slot = usize::try_from(p)
            .ok()
            .and_then(|p| inverse.get_mut(p))
            .filter(|slot| **slot < 0)
            .ok_or_else(invalid)?;
        *slot = i as i64;
    }
    Ok(inverse)
}

/// The values of constant int64 input `i` (`what` names it in the refusal).
fn constant_input(ctx: &Ctx, n: &NodeView, i: usize, what: &str) -> Result<Vec<i64>> {
    ctx.const_ints(n.input(i)).ok_or_else(|| {
        Error::unsupported(format!(
            "its {what} `{}` are computed at run time; kdgraph needs them constant",
            n.input(i)
        ))
    })
}

/// Like [`constant_input`], None when the optional input is absent.
fn optional_constant_input(
    ctx: &Ctx,
    n: &NodeView,
    i: usize,
    what: &str,
) -> Result<Option<Vec<i64>>> {
    if !n.has_input(i) {
        return Ok(None);
    }
    constant_input(ctx, n, i, what).map(Some)
}
