//! Rules for element-wise operators: arithmetic with broadcasting, activations, casts.

use super::Rule;
use crate::autodiff::context::{Ctx, NodeView};
use crate::error::Result;

pub const RULES: &[(&str, Rule)] = &[
    ("Add", add),
    ("Sub", sub),
    ("Mul", mul),
    ("Identity", identity),
    ("Relu", relu),
];

type Adjoints = Result<Vec<Option<String>>>;

/// d(a + b): dy to each side, summed over broadcast axes.
fn add(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Add has one output");
    let mut out = vec![None, None];
    for i in 0..2 {
        if n.needs(i) {
            out[i] = Some(ctx.unbroadcast(dy, n.input(i), n.output(0))?);
        }
    }
    Ok(out)
}

/// d(a - b): dy and -dy, summed over broadcast axes.
fn sub(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Sub has one output");
    let mut out = vec![None, None];
    if n.needs(0) {
        out[0] = Some(ctx.unbroadcast(dy, n.input(0), n.output(0))?);
    }
    if n.needs(1) {
        let neg = ctx.b.unary("Neg", dy, &n.name("neg"));
        out[1] = Some(ctx.unbroadcast(&neg, n.input(1), n.output(0))?);
    }
    Ok(out)
}

/// d(a * b): dy * b and dy * a, summed over broadcast axes.
fn mul(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Mul has one output");
    let mut out = vec![None, None];
    for i in 0..2 {
        if n.needs(i) {
            let other = n.input(1 - i).to_string();
            let product = ctx.b.mul(dy, &other, &n.name(&format!("d{i}")));
            out[i] = Some(ctx.unbroadcast(&product, n.input(i), n.output(0))?);
        }
    }
    Ok(out)
}

/// d(identity): dy.
fn identity(_: &mut Ctx, _: &NodeView, dy: &[Option<String>]) -> Adjoints {
    Ok(vec![dy[0].clone()])
}

/// d relu(x): dy where x > 0, else 0.
fn relu(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Relu has one output");
    let zero = ctx.b.scalar(&n.name("zero"), 0.0);
    let positive = ctx
        .b
        .binary("Greater", n.input(0), &zero, &n.name("positive"));
    let dx = ctx.op("Where", &[&positive, dy, &zero], vec![], &n.name("dx"));
    Ok(vec![Some(dx)])
}
