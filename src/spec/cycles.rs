//! Dependency cycles between stages, found while validating (a pipeline with one is refused
//! before anything runs). The stage graph the scheduler walks (the `dag` module) is built from a
//! valid pipeline; this module needs only the edges, so the spec does not depend on it.

use std::collections::HashMap;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use super::Pipeline;

/// Stages as nodes, in file order; an edge from each stage an input reads to the reader.
fn graph(pipeline: &Pipeline) -> DiGraph<String, ()> {
    let mut graph = DiGraph::new();
    let index: HashMap<&String, NodeIndex> =
        pipeline.stages.keys().map(|name| (name, graph.add_node(name.clone()))).collect();
    for (name, stage) in &pipeline.stages {
        for binding in stage.inputs.values() {
            if let Some(&from) = index.get(&binding.stage) {
                graph.add_edge(from, index[name], ());
            }
        }
    }
    graph
}

/// Every cycle (strongly connected component with more than one stage, or a self-loop), each
/// listed in the order a reader follows the edges, starting at the stage defined first.
pub fn cycles(pipeline: &Pipeline) -> Vec<Vec<String>> {
    let graph = graph(pipeline);
    let order: HashMap<&String, usize> =
        pipeline.stages.keys().enumerate().map(|(i, k)| (k, i)).collect();
    let mut out = Vec::new();
    for scc in tarjan_scc(&graph) {
        let is_cycle = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
        if !is_cycle {
            continue;
        }
        // Walk the cycle from its first-defined stage, following edges inside the component.
        let members: std::collections::HashSet<NodeIndex> = scc.iter().copied().collect();
        let start = *scc.iter().min_by_key(|n| order[&graph[**n]]).unwrap();
        let mut walk = vec![start];
        let mut current = start;
        while walk.len() < scc.len() {
            let next = graph
                .neighbors(current)
                .filter(|n| members.contains(n) && !walk.contains(n))
                .min_by_key(|n| order[&graph[*n]]);
            match next {
                Some(n) => {
                    walk.push(n);
                    current = n;
                }
                None => break,
            }
        }
        // Components that are not a simple ring still list every member.
        for n in &scc {
            if !walk.contains(n) {
                walk.push(*n);
            }
        }
        out.push(walk.into_iter().map(|n| graph[n].clone()).collect());
    }
    out.sort();
    out
}
