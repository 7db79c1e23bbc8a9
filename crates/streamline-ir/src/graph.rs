//! A dataflow graph of nodes in topological order.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::error::{IrError, Result};
use crate::op::Op;
use crate::value::ValueInfo;

/// Index of a value in its graph.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub usize);

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// Where a value comes from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Producer {
    /// The `i`-th graph input.
    Input(usize),
    /// The output of node `i`.
    Node(usize),
}

#[derive(Clone, Debug)]
pub struct Value {
    /// Graph input name, or the producing node's name (names match checkpoint module paths).
    pub name: String,
    pub info: ValueInfo,
    pub producer: Producer,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Arc<dyn Op>,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
}

/// Nodes in topological order by construction: a node can only read values that exist.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    values: Vec<Value>,
    nodes: Vec<Node>,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
    by_name: HashMap<String, ValueId>,
    /// Values a lowering labels by what they mean, for passes and pipelines to find them
    /// without knowing which node happens to make them (see [`Graph::mark`]).
    marks: HashMap<String, ValueId>,
}

/// The mark a UNet lowering puts on up block `n`'s output and Step Rehash looks up: diffusers'
/// module path of the block.
pub fn up_block_mark(n: usize) -> String {
    format!("up_blocks.{n}")
}

/// The mark a UNet lowering puts on the output of the first down block's first layer: the
/// shallow features every step computes, whole or partial (the last up block reads them as
/// a skip), which Step Rehash's auto schedules watch.
pub const SHALLOW_MARK: &str = "down_blocks.0.layers.0";

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    fn add_value(&mut self, name: &str, info: ValueInfo, producer: Producer) -> Result<ValueId> {
        if self.by_name.contains_key(name) {
            return Err(IrError::value(name, "name is used twice in the graph"));
        }
        let id = ValueId(self.values.len());
        self.values.push(Value {
            name: name.to_string(),
            info,
            producer,
        });
        self.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    /// Declare a graph input.
    pub fn input(&mut self, name: &str, info: ValueInfo) -> Result<ValueId> {
        let id = self.add_value(name, info, Producer::Input(self.inputs.len()))?;
        self.inputs.push(id);
        Ok(id)
    }

    /// Append a node; its output's shape, dtype and layout come from [`Op::infer`].
    pub fn push(
        &mut self,
        name: &str,
        op: impl Op + 'static,
        inputs: &[ValueId],
    ) -> Result<ValueId> {
        self.push_arc(name, Arc::new(op), inputs)
    }

    pub fn push_arc(&mut self, name: &str, op: Arc<dyn Op>, inputs: &[ValueId]) -> Result<ValueId> {
        if let Some(bad) = inputs.iter().find(|v| v.0 >= self.values.len()) {
            return Err(IrError::node(
                name,
                format!("reads {bad}, which does not exist yet"),
            ));
        }
        let infos: Vec<&ValueInfo> = inputs.iter().map(|v| &self.values[v.0].info).collect();
        let info = op.infer(&infos).map_err(|e| match e {
            IrError::Node { .. } => e,
            other => IrError::node(name, other.to_string()),
        })?;
        let output = self.add_value(name, info, Producer::Node(self.nodes.len()))?;
        self.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs: inputs.to_vec(),
            output,
        });
        Ok(output)
    }

    /// Label `value` as `label` (e.g. [`up_block_mark`]); a label names one value.
    pub fn mark(&mut self, label: &str, value: ValueId) -> Result<()> {
        if value.0 >= self.values.len() {
            return Err(IrError::Plan(format!(
                "mark `{label}` names {value}, which does not exist"
            )));
        }
        if self.marks.insert(label.to_string(), value).is_some() {
            return Err(IrError::Plan(format!("mark `{label}` is set twice")));
        }
        Ok(())
    }

    /// The value marked `label`.
    pub fn marked(&self, label: &str) -> Option<ValueId> {
        self.marks.get(label).copied()
    }

    pub fn set_outputs(&mut self, outputs: &[ValueId]) {
        self.outputs = outputs.to_vec();
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn values(&self) -> &[Value] {
        &self.values
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.0]
    }

    pub fn info(&self, id: ValueId) -> &ValueInfo {
        &self.values[id.0].info
    }

    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[ValueId] {
        &self.outputs
    }

    /// The value called `name` (a graph input or a node).
    pub fn find(&self, name: &str) -> Result<ValueId> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| IrError::value(name, "no such value in the graph"))
    }

    /// The node producing `id`, if it is not a graph input.
    pub fn producer_node(&self, id: ValueId) -> Option<usize> {
        match self.values[id.0].producer {
            Producer::Node(i) => Some(i),
            Producer::Input(_) => None,
        }
    }

    /// The same graph with its nodes in `order` (a permutation of node indices in which every
    /// node comes after the producers of its inputs). Names, ops and outputs are kept.
    pub fn reordered(&self, order: &[usize]) -> Result<Graph> {
        if order.len() != self.nodes.len() {
            return Err(IrError::Plan(format!(
                "a reordering lists {} of {} nodes",
                order.len(),
                self.nodes.len()
            )));
        }
        let mut g = Graph::new();
        let mut map: HashMap<ValueId, ValueId> = HashMap::new();
        for &id in &self.inputs {
            let v = self.value(id);
            map.insert(id, g.input(&v.name, v.info.clone())?);
        }
        for &i in order {
            let node = self.nodes.get(i).ok_or_else(|| {
                IrError::Plan(format!("a reordering names node {i}, which does not exist"))
            })?;
            let inputs = node
                .inputs
                .iter()
                .map(|v| {
                    map.get(v).copied().ok_or_else(|| {
                        IrError::node(
                            &node.name,
                            "is placed before the producer of one of its inputs",
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            map.insert(
                node.output,
                g.push_arc(&node.name, node.op.clone(), &inputs)?,
            );
        }
        g.outputs = self.outputs.iter().map(|v| map[v]).collect();
        g.marks = self
            .marks
            .iter()
            .map(|(label, v)| (label.clone(), map[v]))
            .collect();
        Ok(g)
    }

    /// Parameter bytes held by all nodes' ops.
    pub fn param_bytes(&self) -> usize {
        self.nodes.iter().map(|n| n.op.param_bytes()).sum()
    }
}

/// One line per input, node and output:
/// `%3 = conv2d[k3] "down.conv" (%1, %2) -> f32[6,4,8,8] f:0 p:~`.
impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &id in &self.inputs {
            let v = self.value(id);
            writeln!(f, "{id} = input \"{}\" -> {}", v.name, v.info)?;
        }
        for node in &self.nodes {
            let args: Vec<String> = node.inputs.iter().map(|v| v.to_string()).collect();
            let params = node.op.describe();
            let params = if params.is_empty() {
                String::new()
            } else {
                format!("[{params}]")
            };
            writeln!(
                f,
                "{} = {}{} \"{}\" ({}) -> {}",
                node.output,
                node.op.kind(),
                params,
                node.name,
                args.join(", "),
                self.info(node.output)
            )?;
        }
        let outs: Vec<String> = self.outputs.iter().map(|v| v.to_string()).collect();
        writeln!(f, "outputs ({})", outs.join(", "))
    }
}
