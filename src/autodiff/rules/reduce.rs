//! Rules for reductions: the adjoint spreads back over the reduced axes.

use super::Rule;
use crate::analysis::shapes::fixed;
use crate::autodiff::context::{first_adjoint, Ctx, NodeView};
use crate::error::{Error, Result};
use crate::onnx::builder::Attr;

pub const RULES: &[(&str, Rule)] = &[
    ("ReduceSum", |c, n, dy| reduction(c, n, dy, d_sum)),
    ("ReduceMean", |c, n, dy| reduction(c, n, dy, d_mean)),
    ("ReduceSumSquare", |c, n, dy| {
        reduction(c, n, dy, d_sum_square)
    }),
    ("ReduceL1", |c, n, dy| reduction(c, n, dy, d_l1)),
    ("ReduceL2", |c, n, dy| reduction(c, n, dy, d_l2)),
    ("ReduceMax", |c, n, dy| reduction(c, n, dy, d_extremum)),
    ("ReduceMin", |c, n, dy| reduction(c, n, dy, d_extremum)),
    ("ReduceLogSumExp", |c, n, dy| {
        reduction(c, n, dy, d_log_sum_exp)
    }),
];

type Adjoints = Result<Vec<Option<String>>>;

/// The axes a reduction reduces (non-negative, sorted): from its attribute or its constant
/// second input; all axes when none are given (unless `noop_with_empty_axes`).
pub fn reduced_axes(ctx: &Ctx, n: &NodeView) -> Result<Vec<i64>> {
    let rank = ctx.rank(n.input(0))? as i64;
    let given = if n.has_input(1) {
        Some(ctx.const_ints(n.input(1)).ok_or_else(|| {
            Error::unsupported(format!(
                "its axes `{}` are computed at run time; kdgraph needs constant axes",
                n.input(1)
            ))
        })?)
    } else {
        n.attr_ints("axes")
    };
    let mut axes: Vec<i64> = match given {
        Some(axes) if !axes.is_empty() => axes
            .iter()
            .map(|&a| if a < 0 { a + rank } else { a })
            .collect(),
        _ if n.attr_int("noop_with_empty_axes", 0) == 1 => Vec::new(),
        _ => (0..rank).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    Ok(axes)
}

/// The adjoint of a reduction's input from dy and the (nonempty) reduced axes.
type InputAdjoint = fn(&mut Ctx, &NodeView, &str, &[i64]) -> Result<String>;

/// A reduction's adjoints: `adjoint`'s for its input, none for its axes. A reduction over no
/// axes (`noop_with_empty_axes`) passes its input through, as the spec and onnxruntime have it.
fn reduction(
    ctx: &mut Ctx,
    n: &NodeView,
    dy: &[Option<String>],
    adjoint: InputAdjoint,
) -> Adjoints {
    let dy = first_adjoint(dy)?;
    let axes = reduced_axes(ctx, n)?;
    let dx = match axes.is_empty() {
        true => dy.to_string(),
        false => adjoint(ctx, n, dy, &axes)?,
    };
    Ok(vec![Some(dx), None])
}

/// A reduced tensor (dy, or the output) with its reduced axes as size-1 dims, so that it
/// broadcasts against the input.
fn kept(ctx: &mut Ctx, n: &NodeView, reduced: &str, axes: &[i64], what: &str) -> String {
    if n.attr_int("keepdims", 1) == 1 {
        return reduced.to_string();
    }
    ctx.b.unsqueeze(reduced, axes, &n.name(what))
}

/// A reduced tensor broadcast back to the input's shape.
fn spread(ctx: &mut Ctx, n: &NodeView, reduced: &str, axes: &[i64]) -> String {
    let kept = kept(ctx, n, reduced, axes, "kept");
    let shape = ctx.b.unary("Shape", n.input(0), &n.name("shape"));
    ctx.op("Expand", &[&kept, &shape], vec![], &n.name("spread"))
}

/// d sum: dy over every reduced element.
fn d_sum(ctx: &mut Ctx, n: &NodeView, dy: &str, axes: &[i64]) -> Result<String> {
    Ok(spread(ctx, n, dy, axes))
}

/// d mean: dy / count over every reduced element.
fn d_mean(ctx: &mut Ctx, n: &NodeView, dy: &str, axes: &[i64]) -> Result<String> {
    let count = reduced_count(ctx, n, axes)?;
    let share = ctx.b.div(dy, &count, &n.name("share"));
    Ok(spread(ctx, n, &share, axes))
}

/// How many elements each output element reduces, as a float scalar: a constant when the
/// reduced dims are fixed, else computed from the sizes of input and output.
fn reduced_count(ctx: &mut Ctx, n: &NodeView, axes: &[i64]) -> Result<String> {
    let shape = ctx.shape(n.input(0))?;
    let dims: Option<Vec<i64>> = axes
        .iter()
        .map(|&a| shape.get(a as usize).and_then(fixed))
        .collect();
    if let Some(dims) = dims {
        let count = dims.iter().product::<i64>() as f32;
        return Ok(ctx.b.scalar(&n.name("count"), count));
    }
    let in_size = ctx.b.unary("Size", n.input(0), &n.name("in_size"));
    let out_size = ctx.b.unary("Size", n.output(0), &n.name("out_size"));
    let count = ctx.b.div(&in_size, &out_size, &n.name("count_i"));
    Ok(ctx.op(
        "Cast",
        &[&count],
        vec![("to", Attr::Int(1))],
        &n.name("count"),
    ))
}

/// d sum(x^2): 2 * x * dy.
fn d_sum_square(ctx: &mut Ctx, n: &NodeView, dy: &str, axes: &[i64]) -> Result<String> {
    let x = n.input(0);
    let twice = ctx.b.add(x, x, &n.name("twice"));
    let dy = kept(ctx, n, dy, axes, "kept");
    Ok(ctx.b.mul(&dy, &twice, &n.name("dx")))
}

/// d sum|x|: dy * sign(x) (0 at 0, as torch).
fn d_l1(ctx: &mut Ctx, n: &NodeView, dy: &str, axes: &[i64]) -> Result<String> {
    let sign = ctx.b.unary("Sign", n.input(0), &n.name("sign"));
    let dy = kept(ctx, n, dy, axes, "kept");
    Ok(ctx.b.mul(&dy, &sign, &n.name("dx")))
}

/// d ||x||_2: x * dy / y, 0 where y = 0 (as torch).
fn d_l2(ctx: &mut Ctx, n: &NodeView, dy: &str, axes: &[i64]) -> Result<String> {
    let y = n.output(0);
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let ratio = ctx.b.div(dy, y, &n.name("ratio"));
    let null = ctx.b.binary("Equal", y, &zero, &n.name("null"));
    let ratio = ctx.op("Where", &[&null, &zero, &ratio], vec![], &n.name("safe"));
    let ratio = kept(ctx, n, &ratio, axes, "kept");
    Ok(ctx.b.mul(n.input(0), &ratio, &n.name("dx")))
}

/// d max / d min, as torch.amax / amin: dy to the elements equal to y, shared equally among ties.
fn d_extremum(ctx: &mut Ctx, n: &NodeView, dy: &str, axes: &[i64]) -> Result<String> {
    let y = kept(ctx, n, n.output(0), axes, "kept_y");
    let hit = ctx.b.binary("Equal", n.input(0), &y, &n.name("hit"));
    let hit = ctx.float_mask(&hit, n.output(0), &n.name("hit_f"));
    let ties = ctx.b.reduce_sum(&hit, axes, &n.name("ties"));
    let dy = kept(ctx, n, dy, axes, "kept");
    let share = ctx.b.div(&dy, &ties, &n.name("share"));
    Ok(ctx.b.mul(&hit, &share, &n.name("dx")))
}

/// d log sum exp(x): dy * exp(x - y).
fn d_log_sum_exp(ctx: &mut Ctx, n: &NodeView, dy: &str, axes: &[i64]) -> Result<String> {
    let y = kept(ctx, n, n.output(0), axes, "kept_y");
    let centred = ctx.b.sub(n.input(0), &y, &n.name("centred"));
    let softmax = ctx.b.unary("Exp", &centred, &n.name("softmax"));
    let dy = kept(ctx, n, dy, axes, "kept");
    Ok(ctx.b.mul(&dy, &softmax, &n.name("dx")))
}
