//! The stage graph: edges come from input bindings (`images: download.images`).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::spec::Pipeline;

/// Stage names as nodes; an edge `a → b` labelled with the binding means b reads a's output.
pub struct Dag {
    pub graph: DiGraph<String, String>,
    index: HashMap<String, NodeIndex>,
}

impl Dag {
    pub fn build(pipeline: &Pipeline) -> Dag {
        let mut graph = DiGraph::new();
        let mut index = HashMap::new();
        for name in pipeline.stages.keys() {
            index.insert(name.clone(), graph.add_node(name.clone()));
        }
        for (name, stage) in &pipeline.stages {
            for (input, binding) in &stage.inputs {
                if let Some(&from) = index.get(&binding.stage) {
                    graph.add_edge(from, index[name], format!("{} → {input}", binding.output));
                }
            }
        }
        Dag { graph, index }
    }

    /// Stages in an order where every stage follows its inputs; ties keep file order.
    pub fn topo_order(&self) -> Vec<String> {
        // Kahn's algorithm, always taking the ready stage defined first (node indices follow
        // file order), so output and summaries read in the order the file is written.
        let mut indegree: Vec<usize> = self
            .graph
            .node_indices()
            .map(|n| self.graph.neighbors_directed(n, petgraph::Direction::Incoming).count())
            .collect();
        let mut ready: BTreeSet<NodeIndex> =
            self.graph.node_indices().filter(|n| indegree[n.index()] == 0).collect();
        let mut out = Vec::with_capacity(indegree.len());
        while let Some(n) = ready.pop_first() {
            out.push(self.graph[n].clone());
            for m in self.graph.neighbors_directed(n, petgraph::Direction::Outgoing) {
                indegree[m.index()] -= 1;
                if indegree[m.index()] == 0 {
                    ready.insert(m);
                }
            }
        }
        // Validation rejected cycles, so every stage is placed.
        debug_assert_eq!(out.len(), self.graph.node_count());
        out
    }

    pub fn upstream(&self, stage: &str) -> Vec<String> {
        self.neighbors(stage, petgraph::Direction::Incoming)
    }

    pub fn downstream(&self, stage: &str) -> Vec<String> {
        self.neighbors(stage, petgraph::Direction::Outgoing)
    }

    fn neighbors(&self, stage: &str, dir: petgraph::Direction) -> Vec<String> {
        let Some(&n) = self.index.get(stage) else {
            return Vec::new();
        };
        let mut out: Vec<String> =
            self.graph.neighbors_directed(n, dir).map(|m| self.graph[m].clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Graphviz `dot` text.
    pub fn to_dot(&self, pipeline: &Pipeline) -> String {
        let mut s =
            String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
        for n in self.graph.node_indices() {
            let name = &self.graph[n];
            let kind = pipeline.stages[name].action.kind_name();
            let _ = writeln!(s, "  \"{name}\" [label=\"{name}\\n({kind})\"];");
        }
        for e in self.graph.edge_indices() {
            let (a, b) = self.graph.edge_endpoints(e).unwrap();
            let _ = writeln!(
                s,
                "  \"{}\" -> \"{}\" [label=\"{}\"];",
                self.graph[a], self.graph[b], self.graph[e]
            );
        }
        s.push_str("}\n");
        s
    }

    /// Mermaid flowchart text (renders on GitHub).
    pub fn to_mermaid(&self, pipeline: &Pipeline) -> String {
        let mut s = String::from("flowchart LR\n");
        for n in self.graph.node_indices() {
            let name = &self.graph[n];
            let kind = pipeline.stages[name].action.kind_name();
            let _ = writeln!(s, "  {}[\"{name}<br/>({kind})\"]", mermaid_id(name));
        }
        for e in self.graph.edge_indices() {
            let (a, b) = self.graph.edge_endpoints(e).unwrap();
            let _ = writeln!(
                s,
                "  {} -->|\"{}\"| {}",
                mermaid_id(&self.graph[a]),
                self.graph[e],
                mermaid_id(&self.graph[b])
            );
        }
        s
    }
}

/// Mermaid node ids must be plain words; stage names may contain `-`.
fn mermaid_id(name: &str) -> String {
    format!("s_{}", name.replace('-', "_h_"))
}
