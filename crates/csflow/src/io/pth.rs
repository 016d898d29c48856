//! PyTorch checkpoints (SPEC 2), read without running anything from the file.
//!
//! A checkpoint is a pickle whose tensors point at raw storages. Two layouts exist:
//! - the zip format of torch >= 1.6: `<top>/data.pkl` plus one entry `<top>/data/<key>` per storage;
//! - the legacy format (`_use_new_zipfile_serialization=False`, and the published EfficientNet weights): a
//!   sequence of pickles (magic number, protocol version, sys info, the object, the sorted storage keys),
//!   then each storage as an 8-byte little-endian element count and its raw bytes.
//!
//! Like PyTorch's `weights_only` loader, the pickle is read by a small virtual machine of our own that
//! knows only the opcodes a tensor dictionary needs, and only an allow-list of globals
//! ([`resolve_global`]); anything else is refused with an error naming the opcode or the global.
//! Objects live in an arena and values refer to them by index, so sharing, mutation and even cycles cost
//! nothing dangerous, and dropping is never recursive.
//!
//! What [`read_pth`] returns:
//! - the state dict: the top-level dict's `"state_dict"` entry if it is a dict, else its `"model"` entry
//!   if that is a dict, else the top-level dict itself;
//! - every tensor in it, nested dicts flattened with `.`-joined names (`{"a": {"b": t}}` gives `a.b`);
//!   entries that are not tensors or dicts (numbers, strings, lists) are skipped;
//! - as contiguous f32 CPU tensors, honouring storage offsets and strides. f16, bf16 and f64 are converted,
//!   and so are integer and bool tensors (e.g. BatchNorm's int64 `num_batches_tracked`), so the names match
//!   PyTorch's `state_dict()` keys one for one; integers above 2^24 lose precision.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Cursor, Read};
use std::path::Path;
use std::rc::Rc;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Internal results carry a message; [`read_pth`] attaches the file name.
type Res<T> = std::result::Result<T, String>;

/// The integer torch pickles first in a legacy file.
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// The legacy format version torch has written since 0.1.
const LEGACY_PROTOCOL: i128 = 1001;
/// Nesting depth of dicts [`read_pth`] follows; state dicts are flat or nested a few levels.
const MAX_DEPTH: usize = 32;
/// Dict entries [`read_pth`] visits at most, so a dict shared many times over cannot make it loop for ages.
const MAX_ENTRIES: usize = 1 << 22;
/// Expanded (stride 0) and overlapping views can hold more elements than their storage, but not this many:
/// all tensors together at most this factor times the elements of the storages read, plus [`SLACK`].
const EXPANSION: usize = 4;
const SLACK: usize = 1 << 24;

/// Reads every tensor of a PyTorch checkpoint's state dict as a contiguous f32 CPU tensor (see the module
/// documentation for which dict is taken and how names are formed). Never runs code from the file: any
/// global outside the allow-list, or any opcode a tensor dictionary does not need, is an error.
pub fn read_pth(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let loaded = if bytes.starts_with(b"PK\x03\x04") {
        load_zip(&bytes)
    } else if bytes.first() == Some(&0x80) {
        load_legacy(&bytes)
    } else {
        Err("not a PyTorch checkpoint (neither a zip archive nor a pickle)".to_string())
    };
    loaded.map_err(|msg| Error::format(path, msg))
}

// ---------------------------------------------------------------------------------------------------
// The two file layouts

/// The zip format: find `data.pkl` (its folder name varies), unpickle it, read storages as entries.
fn load_zip(bytes: &[u8]) -> Res<BTreeMap<String, Tensor>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a readable zip archive, truncated or damaged? ({e})"))?;
    let names: Vec<String> = zip.file_names().filter_map(|n| n.ok()).map(|n| n.into_owned()).collect();
    let prefix = zip_prefix(&names)?;
    if names.iter().any(|n| *n == format!("{prefix}byteorder")) {
        let order = read_entry(&mut zip, &format!("{prefix}byteorder"))?;
        if order.trim_ascii() != b"little" {
            return Err(format!(
                "storages are stored {}-endian; csflow reads little-endian checkpoints",
                String::from_utf8_lossy(order.trim_ascii())
            ));
        }
    }
    let pickle = read_entry(&mut zip, &format!("{prefix}data.pkl"))?;
    let (un, _) = Unpickled::parse(&pickle).map_err(|e| format!("{prefix}data.pkl: {e}"))?;
    let specs = un.tensor_specs()?;
    let mut storages: HashMap<Rc<str>, Vec<u8>> = HashMap::new();
    for spec in specs.values() {
        let key = &spec.storage.key;
        if !storages.contains_key(key) {
            storages.insert(key.clone(), read_entry(&mut zip, &format!("{prefix}data/{key}"))?);
        }
    }
    build_tensors(specs, |key| storages.get(key).map(Vec::as_slice).ok_or_else(|| format!("no storage `{key}`")))
}

/// The folder that holds `data.pkl`: the shallowest one, which must be unique.
fn zip_prefix(names: &[String]) -> Res<String> {
    let depth = |n: &str| n.matches('/').count();
    let pkls: Vec<&String> = names.iter().filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl")).collect();
    let top = pkls.iter().map(|n| depth(n)).min().ok_or("a zip archive without data.pkl: not a PyTorch checkpoint")?;
    let mut shallowest = pkls.iter().filter(|n| depth(n) == top);
    match (shallowest.next(), shallowest.next()) {
        (Some(n), None) => Ok(n[..n.len() - "data.pkl".len()].to_string()),
        _ => Err("the zip archive holds several data.pkl at the same level; which checkpoint is meant?".into()),
    }
}

/// One zip entry's bytes, any compression the zip crate reads (torch writes them stored).
fn read_entry(zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str) -> Res<Vec<u8>> {
    let mut file = zip.by_name(name).map_err(|e| format!("zip entry `{name}`: {e}"))?;
    let mut out = Vec::new();
    file.read_to_end(&mut out).map_err(|e| format!("zip entry `{name}` is unreadable ({e})"))?;
    Ok(out)
}

/// The legacy format: header pickles, the object, the key list, then the storages back to back.
fn load_legacy(bytes: &[u8]) -> Res<BTreeMap<String, Tensor>> {
    let mut pos = 0;
    let mut next = |what: &str| -> Res<Unpickled> {
        let (un, used) = Unpickled::parse(&bytes[pos..]).map_err(|e| format!("{what} pickle at byte {pos}: {e}"))?;
        pos += used;
        Ok(un)
    };
    if !matches!(next("first")?.root, Value::Int(LEGACY_MAGIC)) {
        return Err("a pickle, but not a PyTorch checkpoint (no torch magic number)".into());
    }
    match next("protocol version")?.root {
        Value::Int(LEGACY_PROTOCOL) => {}
        v => return Err(format!("legacy checkpoint protocol {v:?} is not supported (expected 1001)")),
    }
    let info = next("sys info")?;
    if matches!(info.dict_get(&info.root, "little_endian"), Some(Value::Bool(false))) {
        return Err("a big-endian legacy checkpoint; csflow reads little-endian ones".into());
    }
    let main = next("main")?;
    let keys = next("storage key list")?;
    let keys = keys.str_list(&keys.root).ok_or("the storage key list is not a list of strings")?;
    let storages = legacy_storages(&main, &keys, &bytes[pos..])?;
    build_tensors(main.tensor_specs()?, |key| {
        storages.get(key).copied().ok_or_else(|| format!("no data for storage `{key}`"))
    })
}

/// Slices the storages that follow the pickles: per key an element count, then the raw elements.
fn legacy_storages<'a>(main: &Unpickled, keys: &[Rc<str>], mut rest: &'a [u8]) -> Res<HashMap<Rc<str>, &'a [u8]>> {
    let dtypes = main.storage_dtypes()?;
    let mut out = HashMap::new();
    for key in keys {
        let dtype = *dtypes.get(key).ok_or_else(|| format!("storage `{key}` is listed but never used"))?;
        let (head, tail) = rest.split_at_checked(8).ok_or_else(|| format!("file ends before storage `{key}`"))?;
        let count = u64::from_le_bytes(array(head));
        let len = usize::try_from(count).ok().and_then(|c| c.checked_mul(dtype.size()));
        let (data, tail) = len
            .and_then(|len| tail.split_at_checked(len))
            .ok_or_else(|| format!("file ends inside storage `{key}` ({count} elements of {dtype:?}): truncated?"))?;
        out.insert(key.clone(), data);
        rest = tail;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------
// Pickle values

/// Element types of torch storages, named after `torch.FloatStorage` and friends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn from_storage_name(name: &str) -> Option<Self> {
        use Dtype::*;
        Some(match name {
            "FloatStorage" => F32,
            "DoubleStorage" => F64,
            "HalfStorage" => F16,
            "BFloat16Storage" => BF16,
            "LongStorage" => I64,
            "IntStorage" => I32,
            "ShortStorage" => I16,
            "CharStorage" => I8,
            "ByteStorage" => U8,
            "BoolStorage" => Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        use Dtype::*;
        match self {
            F64 | I64 => 8,
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 | U8 | Bool => 1,
        }
    }

    /// One little-endian element (`b` is exactly [`Dtype::size`] bytes) as f32, rounding to nearest.
    fn to_f32(self, b: &[u8]) -> f32 {
        use Dtype::*;
        match self {
            F32 => f32::from_le_bytes(array(b)),
            F64 => f64::from_le_bytes(array(b)) as f32,
            F16 => f16_to_f32(u16::from_le_bytes(array(b))),
            BF16 => f32::from_bits((u16::from_le_bytes(array(b)) as u32) << 16),
            I64 => i64::from_le_bytes(array(b)) as f32,
            I32 => i32::from_le_bytes(array(b)) as f32,
            I16 => i16::from_le_bytes(array(b)) as f32,
            I8 => b[0] as i8 as f32,
            U8 | Bool => b[0] as f32,
        }
    }
}

/// IEEE half to single precision, exactly (every f16 is an f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = (h >> 10) & 0x1f;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => sign * man as f32 * f32::powi(2.0, -24), // zero and subnormals
        0x1f => f32::from_bits(((h as u32 & 0x8000) << 16) | 0x7f80_0000 | (man << 13)), // inf and NaN
        e => f32::from_bits(((h as u32 & 0x8000) << 16) | ((e as u32 + 112) << 23) | (man << 13)),
    }
}

/// The first `N` bytes of `b` as an array; callers pass slices of exactly `N` bytes.
fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// The globals a tensor dictionary needs; nothing else can be named by a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    StorageType(Dtype),
    Device,
}

/// The allow-list. Being named is all that happens to these: [`Machine::call`] interprets the few calls.
fn resolve_global(module: &str, name: &str) -> Res<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Global::RebuildParameter,
        ("torch", "device") => Global::Device,
        ("torch" | "torch.cuda", n) if Dtype::from_storage_name(n).is_some() => {
            Global::StorageType(Dtype::from_storage_name(n).unwrap_or(Dtype::F32))
        }
        _ => {
            return Err(format!(
                "refused: the pickle references the global `{module}.{name}`, which a tensor dictionary does not \
             need (csflow never runs code from a checkpoint)"
            ))
        }
    })
}

/// A value on the pickle stack. Containers, storages and tensors live in the arena and are referenced.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(Rc<str>),
    Global(Global),
    Obj(usize),
}

/// A storage named by a persistent id: its key, element type and (legacy only) a view into a root storage.
#[derive(Clone, Debug)]
struct StorageRef {
    key: Rc<str>,
    dtype: Dtype,
    /// Legacy view metadata: (offset, length) in elements of the root storage.
    view: Option<(usize, usize)>,
}

/// A tensor as `_rebuild_tensor_v2` describes it, before its storage is read.
#[derive(Clone, Debug)]
struct TensorSpec {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion order kept; a repeated key's later entry wins when read, as in Python.
    Dict(Vec<(Value, Value)>),
    Storage(StorageRef),
    Tensor(TensorSpec),
}

// ---------------------------------------------------------------------------------------------------
// The pickle machine

/// One unpickled object graph: its root value and the arena its references point into.
struct Unpickled {
    root: Value,
    objects: Vec<Obj>,
}

/// The machine's state while reading one pickle.
struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each open MARK; nothing below the innermost one may be popped.
    marks: Vec<usize>,
    memo: HashMap<usize, Value>,
    objects: Vec<Obj>,
}

impl Unpickled {
    /// Runs one pickle from the start of `input` to its STOP; returns it and the bytes it used.
    fn parse(input: &[u8]) -> Res<(Unpickled, usize)> {
        let mut m =
            Machine { input, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), objects: Vec::new() };
        loop {
            let at = m.pos;
            let op = m.byte()?;
            if m.step(op).map_err(|e| format!("{e} (opcode {} at byte {at})", opcode_name(op)))? {
                break;
            }
        }
        let root = m.stack.pop().ok_or("the pickle is empty")?;
        Ok((Unpickled { root, objects: m.objects }, m.pos))
    }
}

impl<'a> Machine<'a> {
    /// Executes one opcode (only building values, never calling anything); true at STOP.
    #[rustfmt::skip]
    fn step(&mut self, op: u8) -> Res<bool> {
        match op {
            0x80 => self.protocol()?,                                // PROTO
            0x95 => drop(self.take(8)?),                             // FRAME: opcodes are read in order anyway
            b'.' => return Ok(true),                                 // STOP
            b'(' => self.marks.push(self.stack.len()),               // MARK
            b'N' => self.stack.push(Value::None),                    // NONE
            0x88 | 0x89 => self.stack.push(Value::Bool(op == 0x88)), // NEWTRUE, NEWFALSE
            b'K' => self.int(1)?,                                    // BININT1
            b'M' => self.int(2)?,                                    // BININT2
            b'J' => self.long(0)?,                                   // BININT: 4 bytes, signed
            0x8a => self.long(1)?,                                   // LONG1
            0x8b => self.long(4)?,                                   // LONG4
            b'G' => self.float()?,                                   // BINFLOAT
            0x8c | b'U' => self.string(1)?,                          // SHORT_BINUNICODE, SHORT_BINSTRING
            b'X' | b'T' => self.string(4)?,                          // BINUNICODE, BINSTRING
            0x8d => self.string(8)?,                                 // BINUNICODE8
            b'}' => self.push_obj(Obj::Dict(Vec::new())),            // EMPTY_DICT
            b']' => self.push_obj(Obj::List(Vec::new())),            // EMPTY_LIST
            b')' => self.push_obj(Obj::Tuple(Vec::new())),           // EMPTY_TUPLE
            0x85..=0x87 => self.tuple(Some((op - 0x84).into()))?,    // TUPLE1, TUPLE2, TUPLE3
            b't' => self.tuple(None)?,                               // TUPLE: everything since MARK
            b'q' => self.put(Some(1))?,                              // BINPUT
            b'r' => self.put(Some(4))?,                              // LONG_BINPUT
            0x94 => self.put(None)?,                                 // MEMOIZE: the next free index
            b'h' => self.get(1)?,                                    // BINGET
            b'j' => self.get(4)?,                                    // LONG_BINGET
            b's' => self.add_items(Some(2))?,                        // SETITEM
            b'a' => self.add_items(Some(1))?,                        // APPEND
            b'u' | b'e' => self.add_items(None)?,                    // SETITEMS, APPENDS
            b'c' => self.global(false)?,                             // GLOBAL
            0x93 => self.global(true)?,                              // STACK_GLOBAL
            b'R' | 0x81 => self.reduce(op == 0x81)?,                 // REDUCE, NEWOBJ
            b'b' => self.build()?,                                   // BUILD
            b'Q' => self.persistent_id()?,                           // BINPERSID
            _ => return Err("opcode not supported in a tensor dictionary: refused".into()),
        }
        Ok(false)
    }

    fn protocol(&mut self) -> Res<()> {
        match self.byte()? {
            2..=5 => Ok(()),
            v => Err(format!("pickle protocol {v} is not supported (torch writes 2)")),
        }
    }

    // Reading the input

    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.input.len());
        let end = end.ok_or("the pickle ends early: truncated file?")?;
        let s = &self.input[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }

    /// A little-endian length of `width` bytes, as the string opcodes give it.
    fn length(&mut self, width: usize) -> Res<usize> {
        let b = self.take(width)?;
        let mut a = [0u8; 8];
        a[..width].copy_from_slice(b);
        if width == 4 && b[3] & 0x80 != 0 {
            return Err("negative length".into());
        }
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| "length too large".into())
    }

    /// A newline-terminated ASCII argument (GLOBAL's module and name).
    fn line(&mut self) -> Res<&'a str> {
        let rest = &self.input[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("the pickle ends inside a GLOBAL name")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a GLOBAL name is not text")?;
        self.pos += n + 1;
        Ok(s)
    }

    // Building values

    /// BININT1, BININT2: an unsigned little-endian integer of `width` bytes.
    fn int(&mut self, width: usize) -> Res<()> {
        let v = self.length(width)?;
        self.stack.push(Value::Int(v as i128));
        Ok(())
    }

    /// LONG1/LONG4: a little-endian two's-complement integer whose byte count (at most 16 here) comes
    /// first in `width` bytes; BININT (`width` 0) is the same with a fixed 4 bytes.
    fn long(&mut self, width: usize) -> Res<()> {
        let n = if width == 0 { 4 } else { self.length(width)? };
        if n > 16 {
            return Err(format!("a {n}-byte integer is too large"));
        }
        let b = self.take(n)?;
        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 };
        let mut a = [fill; 16];
        a[..n].copy_from_slice(b);
        self.stack.push(Value::Int(i128::from_le_bytes(a)));
        Ok(())
    }

    /// BINFLOAT: an f64, big-endian.
    fn float(&mut self) -> Res<()> {
        let v = f64::from_be_bytes(array(self.take(8)?));
        self.stack.push(Value::Float(v));
        Ok(())
    }

    /// The string opcodes, with a length prefix of `width` bytes; text must be UTF-8.
    fn string(&mut self, width: usize) -> Res<()> {
        let n = self.length(width)?;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| "a string is not UTF-8")?;
        self.stack.push(Value::Str(s.into()));
        Ok(())
    }

    fn push_obj(&mut self, obj: Obj) {
        self.objects.push(obj);
        self.stack.push(Value::Obj(self.objects.len() - 1));
    }

    /// TUPLE1-3 take `Some(n)` items, TUPLE everything since the innermost MARK.
    fn tuple(&mut self, count: Option<usize>) -> Res<()> {
        let items = self.pop_items(count)?;
        self.push_obj(Obj::Tuple(items));
        Ok(())
    }

    // The stack, marks and memo

    fn pop(&mut self) -> Res<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn pop_str(&mut self) -> Res<Rc<str>> {
        match self.pop()? {
            Value::Str(s) => Ok(s),
            v => Err(format!("expected a string, found {v:?}")),
        }
    }

    /// The top `Some(n)` values, or everything above the innermost MARK (`None`), which is closed.
    fn pop_items(&mut self, count: Option<usize>) -> Res<Vec<Value>> {
        let start = match count {
            Some(n) => {
                let floor = self.marks.last().copied().unwrap_or(0);
                self.stack.len().checked_sub(n).filter(|&s| s >= floor).ok_or("stack underflow")?
            }
            None => self.marks.pop().ok_or("no MARK to close")?,
        };
        Ok(self.stack.split_off(start.min(self.stack.len())))
    }

    /// BINPUT and LONG_BINPUT read an index of `width` bytes; MEMOIZE (`None`) takes the next one.
    fn put(&mut self, width: Option<usize>) -> Res<()> {
        let index = match width {
            Some(w) => self.length(w)?,
            None => self.memo.len(),
        };
        let top = self.stack.last().ok_or("nothing to memoize")?.clone();
        self.memo.insert(index, top);
        Ok(())
    }

    fn get(&mut self, width: usize) -> Res<()> {
        let index = self.length(width)?;
        let v = self.memo.get(&index).ok_or_else(|| format!("memo entry {index} was never stored"))?.clone();
        self.stack.push(v);
        Ok(())
    }

    /// SETITEM(S) and APPEND(S): add the popped items (key-value pairs for a dict) to the dict or list on top.
    fn add_items(&mut self, count: Option<usize>) -> Res<()> {
        let items = self.pop_items(count)?;
        let target = match self.stack.last() {
            Some(Value::Obj(i)) => self.objects.get_mut(*i),
            _ => None,
        };
        match target {
            Some(Obj::List(list)) => list.extend(items),
            Some(Obj::Dict(dict)) if items.len() % 2 == 0 => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.push((k, v));
                }
            }
            _ => return Err("items added to something that is not a dict or list".into()),
        }
        Ok(())
    }

    // The few calls a tensor dictionary makes

    fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.objects.get(*i),
            _ => None,
        }
    }

    fn tuple_items(&self, v: &Value) -> Option<&[Value]> {
        match self.obj(v) {
            Some(Obj::Tuple(items)) => Some(items),
            _ => None,
        }
    }

    /// GLOBAL (module and name inline) or STACK_GLOBAL (both popped): only allow-listed names resolve.
    fn global(&mut self, from_stack: bool) -> Res<()> {
        let g = if from_stack {
            let name = self.pop_str()?;
            let module = self.pop_str()?;
            resolve_global(&module, &name)?
        } else {
            let module = self.line()?;
            resolve_global(module, self.line()?)?
        };
        self.stack.push(Value::Global(g));
        Ok(())
    }

    /// REDUCE and NEWOBJ: a callable and its argument tuple become the call's result.
    fn reduce(&mut self, newobj: bool) -> Res<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let args = self.tuple_items(&args).ok_or("the arguments are not a tuple")?.to_vec();
        let v = self.call(callable, &args, newobj)?;
        self.stack.push(v);
        Ok(())
    }

    /// BINPERSID: the popped persistent id names a storage.
    fn persistent_id(&mut self) -> Res<()> {
        let pid = self.pop()?;
        let storage = self.storage(&pid)?;
        self.push_obj(Obj::Storage(storage));
        Ok(())
    }

    /// REDUCE (and NEWOBJ) of an allowed global: interpreted here, nothing is executed.
    fn call(&mut self, callable: Value, args: &[Value], newobj: bool) -> Res<Value> {
        let g = match callable {
            Value::Global(g) => g,
            v => return Err(format!("{v:?} is not callable")),
        };
        match (g, args) {
            (Global::OrderedDict, []) => {
                self.objects.push(Obj::Dict(Vec::new()));
                Ok(Value::Obj(self.objects.len() - 1))
            }
            _ if newobj => Err(format!("NEWOBJ of {g:?} is not supported")),
            (Global::RebuildTensor, [storage, offset, size, stride, ..]) => {
                let spec = TensorSpec {
                    storage: match self.obj(storage) {
                        Some(Obj::Storage(s)) => s.clone(),
                        _ => return Err("_rebuild_tensor: the first argument is not a storage".into()),
                    },
                    offset: to_usize(offset)?,
                    size: self.usize_tuple(size)?,
                    stride: self.usize_tuple(stride)?,
                };
                if spec.size.len() != spec.stride.len() {
                    return Err(format!("tensor size {:?} and stride {:?} differ in rank", spec.size, spec.stride));
                }
                self.objects.push(Obj::Tensor(spec));
                Ok(Value::Obj(self.objects.len() - 1))
            }
            (Global::RebuildParameter, [data, ..]) if matches!(self.obj(data), Some(Obj::Tensor(_))) => {
                Ok(data.clone())
            }
            (Global::Device, [Value::Str(s), ..]) => Ok(Value::Str(s.clone())),
            _ => Err(format!("unexpected call of {g:?} with {} arguments", args.len())),
        }
    }

    /// BUILD sets an object's state: the `_metadata` of a state dict or a tensor's extras; both ignored.
    fn build(&mut self) -> Res<()> {
        self.pop()?;
        match self.stack.last() {
            Some(v) if matches!(self.obj(v), Some(Obj::Dict(_) | Obj::Tensor(_))) => Ok(()),
            v => Err(format!("BUILD of {v:?} is not supported")),
        }
    }

    /// A persistent id `('storage', storage_type, key, location, numel[, view_metadata])` as a storage.
    fn storage(&self, pid: &Value) -> Res<StorageRef> {
        let bad = || format!("persistent id {pid:?} is not a torch storage");
        let items = self.tuple_items(pid).ok_or_else(bad)?;
        let [Value::Str(kind), Value::Global(Global::StorageType(dtype)), key, _location, _numel, view @ ..] = items
        else {
            return Err(bad());
        };
        let key: Rc<str> = match key {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string().into(),
            _ => return Err(bad()),
        };
        let view = match view {
            [] | [Value::None] => None,
            [v] => match self.tuple_items(v) {
                Some([_view_key, offset, len]) => Some((to_usize(offset)?, to_usize(len)?)),
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        };
        if &**kind != "storage" {
            return Err(bad());
        }
        Ok(StorageRef { key, dtype: *dtype, view })
    }

    fn usize_tuple(&self, v: &Value) -> Res<Vec<usize>> {
        let items = self.tuple_items(v).ok_or_else(|| format!("expected a tuple of sizes, found {v:?}"))?;
        items.iter().map(to_usize).collect()
    }
}

fn to_usize(v: &Value) -> Res<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{i} is not a valid size, stride or offset")),
        _ => Err(format!("expected an integer, found {v:?}")),
    }
}

/// Names for error messages, covering every pickle opcode (most are refused).
#[rustfmt::skip]
fn opcode_name(op: u8) -> String {
    let name = match op {
        b'(' => "MARK", b'.' => "STOP", b'0' => "POP", b'1' => "POP_MARK", b'2' => "DUP", b'F' => "FLOAT",
        b'I' => "INT", b'J' => "BININT", b'K' => "BININT1", b'L' => "LONG", b'M' => "BININT2", b'N' => "NONE",
        b'P' => "PERSID", b'Q' => "BINPERSID", b'R' => "REDUCE", b'S' => "STRING", b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING", b'V' => "UNICODE", b'X' => "BINUNICODE", b'a' => "APPEND", b'b' => "BUILD",
        b'c' => "GLOBAL", b'd' => "DICT", b'}' => "EMPTY_DICT", b'e' => "APPENDS", b'g' => "GET",
        b'h' => "BINGET", b'i' => "INST", b'j' => "LONG_BINGET", b'l' => "LIST", b']' => "EMPTY_LIST",
        b'o' => "OBJ", b'p' => "PUT", b'q' => "BINPUT", b'r' => "LONG_BINPUT", b's' => "SETITEM",
        b't' => "TUPLE", b')' => "EMPTY_TUPLE", b'u' => "SETITEMS", b'G' => "BINFLOAT", b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES", 0x80 => "PROTO", 0x81 => "NEWOBJ", 0x82 => "EXT1", 0x83 => "EXT2",
        0x84 => "EXT4", 0x85 => "TUPLE1", 0x86 => "TUPLE2", 0x87 => "TUPLE3", 0x88 => "NEWTRUE",
        0x89 => "NEWFALSE", 0x8a => "LONG1", 0x8b => "LONG4", 0x8c => "SHORT_BINUNICODE", 0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8", 0x8f => "EMPTY_SET", 0x90 => "ADDITEMS", 0x91 => "FROZENSET", 0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL", 0x94 => "MEMOIZE", 0x95 => "FRAME", 0x96 => "BYTEARRAY8", 0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER", _ => "unknown",
    };
    format!("0x{op:02x} {name}")
}

// ---------------------------------------------------------------------------------------------------
// From the object graph to tensors

impl Unpickled {
    fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.objects.get(*i),
            _ => None,
        }
    }

    /// A dict's entry under a string key (the last one, as Python keeps).
    fn dict_get(&self, dict: &Value, key: &str) -> Option<&Value> {
        match self.obj(dict)? {
            Obj::Dict(entries) => {
                entries.iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if &**s == key)).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    fn str_list(&self, v: &Value) -> Option<Vec<Rc<str>>> {
        match self.obj(v)? {
            Obj::List(items) | Obj::Tuple(items) => {
                items.iter().map(|x| if let Value::Str(s) = x { Some(s.clone()) } else { None }).collect()
            }
            _ => None,
        }
    }

    /// The element type of each storage key; all references to a key must agree.
    fn storage_dtypes(&self) -> Res<HashMap<Rc<str>, Dtype>> {
        let mut out = HashMap::new();
        for obj in &self.objects {
            if let Obj::Storage(s) = obj {
                if out.insert(s.key.clone(), s.dtype).is_some_and(|d| d != s.dtype) {
                    return Err(format!("storage `{}` is referenced with two element types", s.key));
                }
            }
        }
        Ok(out)
    }

    /// The state dict: `"state_dict"` or `"model"` if either holds a dict, else the top-level dict.
    fn state_dict(&self) -> Res<&Value> {
        if !matches!(self.obj(&self.root), Some(Obj::Dict(_))) {
            return Err(format!("the checkpoint holds {}, not a dict of tensors", self.describe(&self.root)));
        }
        let inner = ["state_dict", "model"]
            .iter()
            .filter_map(|k| self.dict_get(&self.root, k))
            .find(|v| matches!(self.obj(v), Some(Obj::Dict(_))));
        Ok(inner.unwrap_or(&self.root))
    }

    fn describe(&self, v: &Value) -> &'static str {
        match self.obj(v) {
            Some(Obj::Tensor(_)) => "a single tensor",
            Some(Obj::List(_) | Obj::Tuple(_)) => "a list",
            Some(_) => "a storage",
            None => "a plain value",
        }
    }

    /// Every tensor of a dict, nested dicts flattened with `.`; later duplicates win.
    fn flatten<'s>(
        &'s self,
        dict: &Value,
        prefix: &str,
        depth: usize,
        budget: &mut usize,
        out: &mut BTreeMap<String, &'s TensorSpec>,
    ) -> Res<()> {
        let Some(Obj::Dict(entries)) = self.obj(dict) else { return Ok(()) };
        if depth > MAX_DEPTH {
            return Err(format!("dicts nested deeper than {MAX_DEPTH} levels at `{prefix}`"));
        }
        for (k, v) in entries {
            *budget = budget.checked_sub(1).ok_or("too many dict entries (shared dicts nested many times?)")?;
            let name = match k {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            let name = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
            match self.obj(v) {
                Some(Obj::Tensor(t)) => {
                    out.insert(name, t);
                }
                Some(Obj::Dict(_)) => self.flatten(v, &name, depth + 1, budget, out)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The state dict's tensors by flattened name, before their storages are read.
    fn tensor_specs(&self) -> Res<BTreeMap<String, &TensorSpec>> {
        let mut specs = BTreeMap::new();
        self.flatten(self.state_dict()?, "", 0, &mut MAX_ENTRIES.clone(), &mut specs)?;
        if specs.is_empty() {
            return Err("the checkpoint's state dict holds no tensors".into());
        }
        Ok(specs)
    }
}

/// Builds the tensors of `specs`, with `storage` giving each storage key's raw bytes.
fn build_tensors<'d>(
    specs: BTreeMap<String, &TensorSpec>,
    storage: impl Fn(&str) -> Res<&'d [u8]>,
) -> Res<BTreeMap<String, Tensor>> {
    let (mut seen, mut stored, mut made) = (HashSet::new(), 0usize, 0usize);
    let mut out = BTreeMap::new();
    for (name, spec) in specs {
        let data = storage(&spec.storage.key)?;
        if seen.insert(spec.storage.key.clone()) {
            stored = stored.saturating_add(data.len() / spec.storage.dtype.size());
        }
        let numel = spec.size.iter().try_fold(1usize, |n, &s| n.checked_mul(s)).unwrap_or(usize::MAX);
        made = made.saturating_add(numel);
        if made > stored.saturating_mul(EXPANSION).saturating_add(SLACK) {
            return Err(format!("tensor `{name}`: the tensors are far larger than their storages"));
        }
        let t = materialize(spec, data).map_err(|e| format!("tensor `{name}`: {e}"))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Gathers a tensor's elements from its storage bytes through offset and strides, as contiguous f32.
fn materialize(spec: &TensorSpec, data: &[u8]) -> Res<Tensor> {
    let TensorSpec { storage, offset, size, stride } = spec;
    let es = storage.dtype.size();
    let data = match storage.view {
        None => Some(data),
        Some((start, len)) => {
            start.checked_add(len).and_then(|end| data.get(start.checked_mul(es)?..end.checked_mul(es)?))
        }
    }
    .ok_or_else(|| format!("storage view {:?} lies outside storage `{}`", storage.view, storage.key))?;
    let numel = size.iter().try_fold(1usize, |n, &s| n.checked_mul(s)).ok_or("size overflows")?;
    let mut values = Vec::new();
    if numel > 0 {
        let last = size.iter().zip(stride).try_fold(*offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?));
        let available = data.len() / es;
        if last.is_none_or(|l| l >= available) {
            return Err(format!(
                "size {size:?}, stride {stride:?} and offset {offset} reach past the end of storage `{}` \
                 ({available} elements of {:?})",
                storage.key, storage.dtype
            ));
        }
        values.try_reserve_exact(numel).map_err(|_| format!("no memory for {numel} elements"))?;
        gather(storage.dtype, data, *offset, size, stride, &mut values);
    }
    Tensor::from_vec(values, size.clone(), &Device::Cpu).map_err(|e| e.to_string())
}

/// Row-major walk over `size`, reading element `offset + sum(index * stride)`; bounds checked by the caller.
fn gather(dtype: Dtype, data: &[u8], offset: usize, size: &[usize], stride: &[usize], out: &mut Vec<f32>) {
    let es = dtype.size();
    let numel: usize = size.iter().product();
    let read = |at: usize| dtype.to_f32(&data[at * es..(at + 1) * es]);
    let mut expected = 1;
    let contiguous = size.iter().zip(stride).rev().all(|(&n, &s)| {
        let ok = n == 1 || s == expected;
        expected *= n;
        ok
    });
    if contiguous {
        out.extend(data[offset * es..(offset + numel) * es].chunks_exact(es).map(|b| dtype.to_f32(b)));
        return;
    }
    let mut index = vec![0usize; size.len()];
    let mut at = offset;
    for _ in 0..numel {
        out.push(read(at));
        // Odometer step; `at` may pass the end transiently (wrapping) but is back in range when read.
        for d in (0..size.len()).rev() {
            index[d] += 1;
            at = at.wrapping_add(stride[d]);
            if index[d] < size[d] {
                break;
            }
            at = at.wrapping_sub(stride[d].wrapping_mul(size[d]));
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        for (h, f) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8),
            (0x8000, -0.0),
            (0x7c00, f32::INFINITY),
            (0x3555, 0.333_251_95),
        ] {
            assert_eq!(f16_to_f32(h).to_bits(), f.to_bits(), "{h:#06x}");
        }
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn gather_honours_strides_and_offset() {
        let data: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut out = Vec::new();
        gather(Dtype::F32, &data, 1, &[2, 3], &[1, 4], &mut out); // a transposed 3x4 block from offset 1
        assert_eq!(out, [1.0, 5.0, 9.0, 2.0, 6.0, 10.0]);
    }

    #[test]
    fn hand_made_pickles() {
        // {'a': (1, -2, 3.5, True, None)} with protocol 2 opcodes.
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00a(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00\x88Nts.";
        let (un, used) = Unpickled::parse(p).expect("parses");
        assert_eq!(used, p.len());
        let tuple = un.dict_get(&un.root, "a").and_then(|v| un.obj(v));
        let want = [Value::Int(1), Value::Int(-2), Value::Float(3.5), Value::Bool(true), Value::None];
        assert!(matches!(tuple, Some(Obj::Tuple(items)) if items[..] == want), "{tuple:?}");
        for (bad, what) in [
            (&b"\x80\x02cos\nsystem\n."[..], "os.system"),
            (b"\x80\x02i", "INST"),
            (b"\x80\x02K", "truncated"),
            (b"\x80\x020", "POP"),
            (b"\x80\x02s.", "underflow"),
        ] {
            let e = Unpickled::parse(bad).err().expect("refused");
            assert!(e.contains(what), "{e}");
        }
    }
}
