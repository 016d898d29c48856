//! The ONNX messages an exported model needs (field numbers of `onnx.proto`, IR version 8, opset 17),
//! encoded by prost, and a small builder that names values and collects nodes and initializers.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::Result;

/// IR version 8 is the one that goes with opset 17.
const IR_VERSION: i64 = 8;
pub const OPSET: i64 = 17;
/// TensorProto.DataType values.
const FLOAT: i32 = 1;
const INT64: i32 = 7;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(int64, optional, tag = "1")]
    pub ir_version: Option<i64>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(string, optional, tag = "2")]
    pub producer_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub producer_version: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub doc_string: Option<String>,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    #[prost(string, optional, tag = "1")]
    pub domain: Option<String>,
    #[prost(int64, optional, tag = "2")]
    pub version: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    #[prost(string, optional, tag = "1")]
    pub key: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, optional, tag = "2")]
    pub name: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub op_type: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

/// AttributeProto.AttributeType values.
const ATTR_FLOAT: i32 = 1;
const ATTR_INT: i32 = 2;
const ATTR_INTS: i32 = 7;

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(int32, optional, tag = "20")]
    pub r#type: Option<i32>,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    /// proto2 `repeated int64` without `packed`: one field per value.
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, optional, tag = "2")]
    pub data_type: Option<i32>,
    #[prost(string, optional, tag = "8")]
    pub name: Option<String>,
    /// Little-endian values, row-major.
    #[prost(bytes = "vec", optional, tag = "9")]
    pub raw_data: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// TypeProto with only its `tensor_type` member.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorTypeProto {
    #[prost(int32, optional, tag = "1")]
    pub elem_type: Option<i32>,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// A dimension: a size, or a name for a size given at run time (one of the two is set).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// A node attribute.
pub enum Attr<'a> {
    Int(&'a str, i64),
    Ints(&'a str, Vec<i64>),
    Float(&'a str, f32),
}

impl Attr<'_> {
    fn proto(self) -> AttributeProto {
        let mut a = AttributeProto::default();
        match self {
            Attr::Int(n, v) => (a.name, a.r#type, a.i) = (Some(n.into()), Some(ATTR_INT), Some(v)),
            Attr::Ints(n, v) => (a.name, a.r#type, a.ints) = (Some(n.into()), Some(ATTR_INTS), v),
            Attr::Float(n, v) => (a.name, a.r#type, a.f) = (Some(n.into()), Some(ATTR_FLOAT), Some(v)),
        }
        a
    }
}

/// A dimension of a graph input or output: fixed, or named and given at run time.
pub enum Dim {
    Fixed(usize),
    Named(&'static str),
}

/// A graph being built: nodes in the order added (which must be topological), initializers, and the names
/// given so far (each value's name is unique: a prefix and a counter).
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    /// Constants by (data type, shape, bytes), to their initializer's name.
    constants: HashMap<(i32, Vec<usize>, Vec<u8>), String>,
    count: usize,
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Dimension { dim_value: Some(*n as i64), dim_param: None },
            Dim::Named(s) => Dimension { dim_value: None, dim_param: Some((*s).into()) },
        })
        .collect();
    let tensor = TensorTypeProto { elem_type: Some(FLOAT), shape: Some(TensorShapeProto { dim }) };
    ValueInfoProto { name: Some(name.into()), r#type: Some(TypeProto { tensor_type: Some(tensor) }) }
}

impl Graph {
    fn fresh(&mut self, prefix: &str) -> String {
        self.count += 1;
        format!("{prefix}_{}", self.count)
    }

    /// A float32 graph input.
    pub fn input(&mut self, name: &str, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, dims));
        name.to_string()
    }

    /// Marks `value` as a float32 graph output named `name` (through an Identity node when it has another
    /// name).
    pub fn output(&mut self, value: &str, name: &str, dims: &[Dim]) {
        self.nodes.push(NodeProto {
            input: vec![value.into()],
            output: vec![name.into()],
            op_type: Some("Identity".into()),
            ..Default::default()
        });
        self.outputs.push(value_info(name, dims));
    }

    /// A float32 initializer holding `t` (any float dtype, written as f32), named `name`.
    pub fn weight(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name.to_string(), FLOAT, t.dims(), raw);
        Ok(name.to_string())
    }

    /// A float32 constant of the given shape.
    pub fn floats(&mut self, values: &[f32], dims: &[usize]) -> String {
        self.constant(FLOAT, dims, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A one-dimensional int64 constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.constant(INT64, &[values.len()], values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A constant's initializer, one per distinct value (the flow asks for the same slice bounds and
    /// upsampling matrices in every block).
    fn constant(&mut self, data_type: i32, dims: &[usize], raw: Vec<u8>) -> String {
        let key = (data_type, dims.to_vec(), raw);
        if let Some(name) = self.constants.get(&key) {
            return name.clone();
        }
        let name = self.fresh("const");
        self.initializer(name.clone(), data_type, dims, key.2.clone());
        self.constants.insert(key, name.clone());
        name
    }

    fn initializer(&mut self, name: String, data_type: i32, dims: &[usize], raw: Vec<u8>) {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(data_type),
            name: Some(name),
            raw_data: Some(raw),
        });
    }

    /// Adds a node of `op` on `inputs` ("" for an omitted optional input); returns its one output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<Attr>) -> String {
        let out = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: Some(out.clone()),
            op_type: Some(op.into()),
            attribute: attrs.into_iter().map(Attr::proto).collect(),
        });
        out
    }

    /// The model file's bytes: this graph under opset 17, with `doc` and `metadata` (key, value) pairs. A
    /// protobuf message cannot exceed 2 GB, so larger graphs are refused (the paper-size flow with B5 is
    /// about 1.2 GB).
    pub fn encode(self, doc: &str, metadata: &[(String, String)]) -> Result<Vec<u8>> {
        use prost::Message;
        let weights: usize = self.initializers.iter().map(|t| t.raw_data.as_ref().map_or(0, Vec::len)).sum();
        if weights >= (2 << 30) - (64 << 20) {
            return Err(crate::Error::Invalid(format!(
                "the model's {:.2} GB of weights do not fit in one ONNX file (a protobuf message holds at most 2 GB)",
                weights as f64 / 1e9
            )));
        }
        let graph = GraphProto {
            node: self.nodes,
            name: Some("csflow".into()),
            initializer: self.initializers,
            input: self.inputs,
            output: self.outputs,
        };
        let model = ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) }],
            producer_name: Some("csflow".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            doc_string: Some(doc.into()),
            graph: Some(graph),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto { key: Some(k.clone()), value: Some(v.clone()) })
                .collect(),
        };
        Ok(model.encode_to_vec())
    }
}
