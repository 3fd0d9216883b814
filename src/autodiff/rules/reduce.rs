//! Rules for reductions: the adjoint spreads back over the reduced axes.

use super::Rule;
use crate::autodiff::context::{Ctx, NodeView};
use crate::error::{Error, Result};

pub const RULES: &[(&str, Rule)] = &[("ReduceSum", reduce_sum), ("ReduceMean", reduce_mean)];

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

/// dy with the reduced axes restored as size-1 dims, broadcast back to the input's shape.
fn spread(ctx: &mut Ctx, n: &NodeView, dy: &str, axes: &[i64]) -> Result<String> {
    let kept = if n.attr_int("keepdims", 1) == 1 || axes.is_empty() {
        dy.to_string()
    } else {
        ctx.b.unsqueeze(dy, axes, &n.name("kept"))
    };
    let shape = ctx.b.unary("Shape", n.input(0), &n.name("shape"));
    Ok(ctx.op("Expand", &[&kept, &shape], vec![], &n.name("spread")))
}

/// d sum: dy over every reduced element.
fn reduce_sum(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("ReduceSum has one output");
    let axes = reduced_axes(ctx, n)?;
    Ok(vec![Some(spread(ctx, n, dy, &axes)?), None])
}

/// d mean: dy / count over every reduced element.
fn reduce_mean(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("ReduceMean has one output");
    let axes = reduced_axes(ctx, n)?;
    let spread = spread(ctx, n, dy, &axes)?;
    let in_size = ctx.b.unary("Size", n.input(0), &n.name("in_size"));
    let out_size = ctx.b.unary("Size", n.output(0), &n.name("out_size"));
    let count = ctx.b.div(&in_size, &out_size, &n.name("count"));
    let count = ctx.op(
        "Cast",
        &[&count],
        vec![("to", crate::onnx::builder::Attr::Int(1))],
        &n.name("count_f"),
    );
    Ok(vec![Some(ctx.b.div(&spread, &count, &n.name("dx"))), None])
}
