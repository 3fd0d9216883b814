//! The data-carrying part of a graph as a petgraph graph: nodes linked by the tensors they pass,
//! with shape-only paths (Shape/Size and everything computed from them) left out.

use std::collections::{HashMap, HashSet};

use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::onnx::pb;

/// Ops that learn a transformation of their input.
const LEARNED_OPS: [&str; 4] = ["Conv", "ConvTranspose", "Gemm", "MatMul"];

/// Ops whose outputs depend on a tensor's shape only, never on its values.
const SHAPE_ONLY_OPS: [&str; 2] = ["Shape", "Size"];

pub struct Dataflow<'a> {
    pub graph: &'a pb::GraphProto,
    /// Vertex 0 is a virtual source feeding every graph input; vertex i+1 is `graph.node[i]`.
    flow: DiGraph<(), ()>,
    /// Tensors whose values derive from the graph inputs (not only from their shapes).
    data: HashSet<&'a str>,
    /// The node index that produces each tensor.
    producer: HashMap<&'a str, usize>,
    /// The node indices that read each data tensor.
    consumers: HashMap<&'a str, Vec<usize>>,
    initializers: HashSet<&'a str>,
}

impl<'a> Dataflow<'a> {
    pub fn new(graph: &'a pb::GraphProto) -> Self {
        let initializers: HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let mut data: HashSet<&str> = graph
            .input
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| !initializers.contains(n))
            .collect();
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut flow = DiGraph::with_capacity(graph.node.len() + 1, graph.node.len() * 2);
        let source = flow.add_node(());
        for (index, node) in graph.node.iter().enumerate() {
            let vertex = flow.add_node(());
            let mut reads_data = false;
            for input in node.input.iter().filter(|i| data.contains(i.as_str())) {
                reads_data = true;
                consumers.entry(input.as_str()).or_default().push(index);
                let from = producer
                    .get(input.as_str())
                    .map(|&p| NodeIndex::new(p + 1))
                    .unwrap_or(source);
                flow.update_edge(from, vertex, ());
            }
            for output in node.output.iter().filter(|o| !o.is_empty()) {
                producer.insert(output.as_str(), index);
                if reads_data && !SHAPE_ONLY_OPS.contains(&node.op_type.as_str()) {
                    data.insert(output.as_str());
                }
            }
        }
        Dataflow {
            graph,
            flow,
            data,
            producer,
            consumers,
            initializers,
        }
    }

    pub fn producer(&self, tensor: &str) -> Option<&'a pb::NodeProto> {
        self.producer.get(tensor).map(|&i| &self.graph.node[i])
    }

    pub fn is_initializer(&self, tensor: &str) -> bool {
        self.initializers.contains(tensor)
    }

    pub fn is_data(&self, tensor: &str) -> bool {
        self.data.contains(tensor)
    }

    /// The inputs of a node that carry data (not weights, not shapes).
    pub fn data_inputs<'n>(
        &'n self,
        node: &'n pb::NodeProto,
    ) -> impl Iterator<Item = &'n str> + 'n {
        node.input
            .iter()
            .map(String::as_str)
            .filter(move |i| self.data.contains(i))
    }

    /// The cut tensors on the way to `target`: tensors that every data path from the graph
    /// inputs to `target` passes through, in order from the input side, ending with `target`.
    pub fn cuts_to(&self, target: &str) -> Vec<&'a str> {
        let Some(&target_node) = self.producer.get(target) else {
            return Vec::new();
        };
        let target_vertex = NodeIndex::new(target_node + 1);
        let ancestors = self.ancestors(target_vertex);
        let doms = dominators::simple_fast(&self.flow, NodeIndex::new(0));
        let Some(chain) = doms.dominators(target_vertex) else {
            return Vec::new();
        };
        let mut cuts: Vec<&str> = chain
            .filter(|v| v.index() > 0)
            .filter_map(|v| {
                let node = &self.graph.node[v.index() - 1];
                if v == target_vertex {
                    return node
                        .output
                        .iter()
                        .find(|o| *o == target)
                        .map(String::as_str);
                }
                let mut onward = node.output.iter().filter(|o| {
                    self.data.contains(o.as_str()) && self.is_read_by_any(o, &ancestors)
                });
                match (onward.next(), onward.next()) {
                    (Some(only), None) => Some(only.as_str()),
                    _ => None,
                }
            })
            .collect();
        cuts.reverse();
        cuts
    }

    fn is_read_by_any(&self, tensor: &str, vertices: &HashSet<NodeIndex>) -> bool {
        self.consumers
            .get(tensor)
            .is_some_and(|c| c.iter().any(|&n| vertices.contains(&NodeIndex::new(n + 1))))
    }

    /// Whether a convolution or matrix product lies on the data paths from `from` to `to`.
    pub fn learns_between(&self, from: &str, to: &str) -> bool {
        let Some(&start) = self.producer.get(to) else {
            return false;
        };
        let stop = self.producer.get(from).copied();
        let mut seen = HashSet::from([start]);
        let mut stack = vec![start];
        while let Some(index) = stack.pop() {
            let node = &self.graph.node[index];
            if LEARNED_OPS.contains(&node.op_type.as_str()) {
                return true;
            }
            for input in self.data_inputs(node) {
                if let Some(&p) = self.producer.get(input) {
                    if Some(p) != stop && seen.insert(p) {
                        stack.push(p);
                    }
                }
            }
        }
        false
    }

    /// The nodes that read a data tensor.
    pub fn consumers(&self, tensor: &str) -> impl Iterator<Item = &'a pb::NodeProto> + '_ {
        self.consumers
            .get(tensor)
            .into_iter()
            .flatten()
            .map(|&n| &self.graph.node[n])
    }

    /// Every vertex from which `target` can be reached, `target` included.
    fn ancestors(&self, target: NodeIndex) -> HashSet<NodeIndex> {
        let mut seen = HashSet::from([target]);
        let mut stack = vec![target];
        while let Some(v) = stack.pop() {
            for u in self.flow.neighbors_directed(v, Direction::Incoming) {
                if seen.insert(u) {
                    stack.push(u);
                }
            }
        }
        seen
    }
}
