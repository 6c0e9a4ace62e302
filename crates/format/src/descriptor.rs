//! `DiskDescriptor.xml`: the list of deltas and the snapshot tree, read and
//! written the way OpenVZ's libploop does (sizes in sectors, braced GUIDs,
//! the fixed top GUID, file names relative to the descriptor's folder).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use quick_xml::events::Event;
use quick_xml::Reader;
use uuid::Uuid;

use crate::{Error, Result};

/// GUID the current top delta always carries.
pub const TOP_GUID: Uuid = Uuid::from_u128(0x5fbaabe3_6958_40ff_92a7_860e329aab41);
/// Parent GUID of the base delta.
pub const NONE_GUID: Uuid = Uuid::nil();
/// OpenVZ allows this many deltas in one chain.
pub const MAX_DELTAS: usize = 128;
/// Images one descriptor may list (all branches of its snapshot tree):
/// far more than any disk has, and few enough that a descriptor listing
/// a hostile number is refused before it costs anything.
pub const MAX_IMAGES: usize = 8 * MAX_DELTAS;
pub const FILE_NAME: &str = "DiskDescriptor.xml";

/// `<Type>`: Compressed is the ploop format, Plain is raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageType {
    Compressed,
    Plain,
}

impl ImageType {
    fn as_str(self) -> &'static str {
        match self {
            ImageType::Compressed => "Compressed",
            ImageType::Plain => "Plain",
        }
    }
}

/// What a descriptor holds that is not modelled here (OpenVZ's
/// `<Encryption>`, `<Max_delta_size>`, `<Volume>`, a newer tool's
/// elements, attributes): kept as read and written back in place, so
/// that no rewrite loses it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extra {
    /// The element's own attributes, escaped, with a leading space.
    pub attrs: String,
    /// Unknown child elements as XML, each after the known child it
    /// followed (None: before them all).
    pub children: Vec<(Option<String>, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    pub guid: Uuid,
    pub kind: ImageType,
    /// As written in the descriptor (relative to its folder, or absolute).
    pub file: String,
    pub extra: Extra,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shot {
    pub guid: Uuid,
    pub parent: Uuid,
    /// OpenVZ's `<Temporary/>`: the snapshot is to be merged away. A merge
    /// marks its target so while it writes the child's clusters into it:
    /// until the merge is finished, what the snapshot itself holds is a
    /// mix that never existed, and it must not be opened on its own.
    pub temporary: bool,
    pub extra: Extra,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Virtual size in sectors.
    pub size_sectors: u64,
    pub cylinders: u32,
    pub heads: u32,
    /// Cluster size in sectors.
    pub blocksize: u32,
    pub preallocated: bool,
    pub images: Vec<ImageEntry>,
    pub top_guid: Uuid,
    pub snapshots: Vec<Shot>,
    /// OpenVZ's `<Encryption><KeyId>`: the disk is encrypted (LUKS inside
    /// the virtual disk) with this key. Read only; the element itself is
    /// kept in `extras`.
    pub encryption_key_id: Option<String>,
    /// Unmodelled content of each container element, written back.
    pub extras: Extras,
}

/// [`Extra`] of the descriptor's fixed elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extras {
    /// The root element's name as read, when not ours (OpenVZ has used
    /// several).
    pub root_name: Option<String>,
    pub root: Extra,
    pub disk_parameters: Extra,
    pub storage_data: Extra,
    pub storage: Extra,
    pub snapshots: Extra,
}

/// The root element this tool names new descriptors with.
const DEFAULT_ROOT: &str = "Parallels_disk_image";
const ROOT_KNOWN: &[&str] = &["Disk_Parameters", "StorageData", "Snapshots"];
const PARAMS_KNOWN: &[&str] = &["Disk_size", "Cylinders", "Heads", "Sectors", "Padding"];
const STORAGE_DATA_KNOWN: &[&str] = &["Storage"];
const STORAGE_KNOWN: &[&str] = &["Start", "End", "Blocksize", "Preallocated", "Image"];
const IMAGE_KNOWN: &[&str] = &["GUID", "Type", "File"];
const SNAPSHOTS_KNOWN: &[&str] = &["TopGUID", "Shot"];
const SHOT_KNOWN: &[&str] = &["GUID", "ParentGUID", "Temporary"];

/// Write an element: its known children (name, lines already indented)
/// with its unmodelled ones put back where they were.
fn element(x: &mut String, indent: usize, name: &str, extra: &Extra, known: &[(&str, String)]) {
    let pad = " ".repeat(indent);
    let inner = " ".repeat(indent + 2);
    let _ = writeln!(x, "{pad}<{name}{}>", extra.attrs);
    let put = |x: &mut String, anchor: Option<&str>| {
        for (a, xml) in &extra.children {
            if a.as_deref() == anchor {
                let _ = writeln!(x, "{inner}{xml}");
            }
        }
    };
    put(x, None);
    let mut placed: Vec<&str> = Vec::new();
    for (i, (child, lines)) in known.iter().enumerate() {
        x.push_str(lines);
        // After the last of a run of same-named children.
        if known.get(i + 1).is_none_or(|(next, _)| next != child) {
            put(x, Some(child));
            placed.push(child);
        }
    }
    // Anchored to a known child not written this time: at the end.
    for (a, xml) in &extra.children {
        if a.as_deref().is_some_and(|a| !placed.contains(&a)) {
            let _ = writeln!(x, "{inner}{xml}");
        }
    }
    let _ = writeln!(x, "{pad}</{name}>");
}

fn leaf(indent: usize, name: &str, value: impl std::fmt::Display) -> String {
    format!("{}<{name}>{value}</{name}>\n", " ".repeat(indent))
}

/// Format a GUID the way libploop does: lowercase, in braces.
pub fn guid_string(g: &Uuid) -> String {
    format!("{{{}}}", g.hyphenated())
}

/// Parse a GUID with or without braces.
pub fn parse_guid(s: &str) -> Option<Uuid> {
    let t = s.trim();
    let t = t
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(t);
    if t.len() != 36 {
        return None;
    }
    Uuid::parse_str(t).ok()
}

/// A descriptor is four levels deep; anything far deeper is hostile.
const MAX_DEPTH: usize = 32;

/// A tiny element tree: enough for a descriptor, nothing more.
#[derive(Debug, Default)]
struct Node {
    name: String,
    /// The attributes as written, escaped (with their leading space).
    attrs: String,
    text: String,
    children: Vec<Node>,
}

impl Node {
    /// The element as XML on one line (text escaped, attributes as read).
    fn to_xml(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        out.push_str(&self.attrs);
        let text = self.text.trim();
        if text.is_empty() && self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        out.push_str(&escape(text));
        for c in &self.children {
            c.to_xml(out);
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }

    /// What of this element a descriptor does not model: its attributes,
    /// and the children not named in `known`, each placed after the known
    /// child it followed.
    fn extra(&self, known: &[&str]) -> Extra {
        let mut extra = Extra {
            attrs: self.attrs.clone(),
            children: Vec::new(),
        };
        let mut after: Option<String> = None;
        for c in &self.children {
            if known.contains(&c.name.as_str()) {
                after = Some(c.name.clone());
            } else {
                let mut xml = String::new();
                c.to_xml(&mut xml);
                extra.children.push((after.clone(), xml));
            }
        }
        extra
    }
    fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

fn parse_tree(text: &str, path: &str) -> Result<Node> {
    let bad = |what: String| Error::Descriptor {
        path: path.to_string(),
        what,
    };
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Node> = vec![Node::default()];
    loop {
        let event = reader.read_event().map_err(|e| {
            bad(format!(
                "malformed XML at byte {}: {e}",
                reader.buffer_position()
            ))
        })?;
        match event {
            Event::Start(_) if stack.len() > MAX_DEPTH => {
                return Err(bad(format!("elements nested deeper than {MAX_DEPTH}")));
            }
            Event::Start(e) => stack.push(Node {
                name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                attrs: raw_attrs(&e),
                ..Node::default()
            }),
            Event::Empty(e) => {
                let node = Node {
                    name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                    attrs: raw_attrs(&e),
                    ..Node::default()
                };
                stack.last_mut().expect("root").children.push(node);
            }
            Event::End(_) => {
                let node = stack.pop().expect("balanced by the reader");
                let parent = stack
                    .last_mut()
                    .ok_or_else(|| bad("unbalanced closing tag".into()))?;
                parent.children.push(node);
            }
            Event::Text(t) => {
                let s = t
                    .decode()
                    .map_err(|e| bad(format!("bad text encoding: {e}")))?;
                stack.last_mut().expect("root").text.push_str(&s);
            }
            Event::CData(t) => {
                let s = t
                    .decode()
                    .map_err(|e| bad(format!("bad text encoding: {e}")))?;
                stack.last_mut().expect("root").text.push_str(&s);
            }
            Event::GeneralRef(r) => {
                let name = r.decode().map_err(|e| bad(format!("bad entity: {e}")))?;
                let ch = match &*name {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    _ => r
                        .resolve_char_ref()
                        .ok()
                        .flatten()
                        .ok_or_else(|| bad(format!("unknown entity &{name};")))?,
                };
                stack.last_mut().expect("root").text.push(ch);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if stack.len() != 1 {
        return Err(bad("unexpected end of file: unclosed element".into()));
    }
    let mut doc = stack.pop().expect("document");
    match doc.children.len() {
        1 => Ok(doc.children.pop().expect("one root")),
        0 => Err(bad("no root element".into())),
        _ => Err(bad("more than one root element".into())),
    }
}

/// An element's attributes as written (still escaped), with a leading
/// space, or nothing.
fn raw_attrs(e: &quick_xml::events::BytesStart) -> String {
    let raw = String::from_utf8_lossy(e.attributes_raw())
        .trim()
        .to_string();
    if raw.is_empty() {
        raw
    } else {
        format!(" {raw}")
    }
}

fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

impl Descriptor {
    /// A descriptor for a single base image.
    pub fn new_single(
        size_sectors: u64,
        blocksize: u32,
        kind: ImageType,
        file: &str,
        preallocated: bool,
    ) -> Self {
        let chs = crate::ploop::header::Chs::from_sectors(size_sectors);
        Self {
            size_sectors,
            cylinders: chs.cylinders,
            heads: chs.heads,
            blocksize,
            preallocated,
            images: vec![ImageEntry {
                guid: TOP_GUID,
                kind,
                file: file.to_string(),
                extra: Extra::default(),
            }],
            top_guid: TOP_GUID,
            snapshots: vec![Shot {
                guid: TOP_GUID,
                parent: NONE_GUID,
                temporary: false,
                extra: Extra::default(),
            }],
            encryption_key_id: None,
            extras: Extras::default(),
        }
    }

    pub fn parse(text: &str, path: &str) -> Result<Self> {
        let bad = |what: String| Error::Descriptor {
            path: path.to_string(),
            what,
        };
        // The root's name is not checked, as in libploop: both
        // Parallels_disk_image and older spellings are accepted.
        let root = parse_tree(text, path)?;
        let missing = |n: &str| bad(format!("'{n}' element not found"));
        let number = |node: &Node, name: &str| -> Result<Option<u64>> {
            match node.child(name) {
                None => Ok(None),
                Some(n) => {
                    let t = n.text.trim();
                    let v = if let Some(hex) = t.strip_prefix("0x") {
                        u64::from_str_radix(hex, 16)
                    } else {
                        t.parse()
                    };
                    v.map(Some)
                        .map_err(|_| bad(format!("<{name}> is not a number: {t:?}")))
                }
            }
        };
        let params = root
            .child("Disk_Parameters")
            .ok_or_else(|| missing("Disk_Parameters"))?;
        let storage_data = root
            .child("StorageData")
            .ok_or_else(|| missing("StorageData"))?;
        let mut storages = storage_data.all("Storage");
        let storage = storages.next().ok_or_else(|| missing("Storage"))?;
        if storages.next().is_some() {
            return Err(bad(
                "more than one <Storage> (split disks are not supported)".into(),
            ));
        }
        let blocksize = number(storage, "Blocksize")?.ok_or_else(|| missing("Blocksize"))?;
        if !(8..=131072).contains(&blocksize) || !blocksize.is_power_of_two() {
            return Err(bad(format!(
                "invalid <Blocksize> {blocksize}: must be a power of two from 8 to 131072 sectors"
            )));
        }
        let size_sectors = match number(params, "Disk_size")? {
            Some(v) => v,
            None => number(storage, "End")?.ok_or_else(|| missing("Disk_size"))?,
        };
        if size_sectors.checked_mul(512).is_none() {
            return Err(bad(format!("<Disk_size> {size_sectors} sectors overflows")));
        }
        let small = |v: Option<u64>, name: &str| -> Result<u32> {
            u32::try_from(v.unwrap_or(0)).map_err(|_| bad(format!("<{name}> is too large")))
        };
        let cylinders = small(number(params, "Cylinders")?, "Cylinders")?;
        let heads = small(number(params, "Heads")?, "Heads")?;
        let preallocated = match number(storage, "Preallocated")? {
            None | Some(0) => false,
            Some(1) => true,
            Some(v) => return Err(bad(format!("invalid <Preallocated> {v}"))),
        };
        let guid_of = |node: &Node, name: &str| -> Result<Uuid> {
            let n = node.child(name).ok_or_else(|| missing(name))?;
            parse_guid(&n.text).ok_or_else(|| bad(format!("<{name}> is not a GUID: {:?}", n.text)))
        };
        if storage.all("Image").count() > MAX_IMAGES
            || root
                .child("Snapshots")
                .is_some_and(|s| s.all("Shot").count() > MAX_IMAGES)
        {
            return Err(bad(format!(
                "more than {MAX_IMAGES} images or snapshots: refused"
            )));
        }
        let mut images = Vec::new();
        for img in storage.all("Image") {
            let kind = match img.child("Type").map(|t| t.text.trim()) {
                Some("Plain") => ImageType::Plain,
                Some("Compressed") | None => ImageType::Compressed,
                Some(other) => return Err(bad(format!("unknown image <Type> {other:?}"))),
            };
            let file = img
                .child("File")
                .ok_or_else(|| missing("File"))?
                .text
                .trim();
            if file.is_empty() {
                return Err(bad("an <Image> has an empty <File>".into()));
            }
            images.push(ImageEntry {
                guid: guid_of(img, "GUID")?,
                kind,
                file: file.to_string(),
                extra: img.extra(IMAGE_KNOWN),
            });
        }
        if images.is_empty() {
            return Err(bad("no <Image> entries".into()));
        }
        if preallocated && images.iter().any(|i| i.kind == ImageType::Plain) {
            return Err(bad(
                "<Preallocated> is not compatible with Plain images".into()
            ));
        }
        let snaps = root
            .child("Snapshots")
            .ok_or_else(|| missing("Snapshots"))?;
        let mut snapshots = Vec::new();
        for shot in snaps.all("Shot") {
            snapshots.push(Shot {
                guid: guid_of(shot, "GUID")?,
                parent: guid_of(shot, "ParentGUID")?,
                temporary: shot.child("Temporary").is_some(),
                extra: shot.extra(SHOT_KNOWN),
            });
        }
        let top_guid = match snaps.child("TopGUID") {
            Some(_) => guid_of(snaps, "TopGUID")?,
            None => TOP_GUID,
        };
        let encryption_key_id = params
            .child("Encryption")
            .map(|e| e.child("KeyId").map_or("", |k| k.text.trim()).to_string());
        let extras = Extras {
            root_name: (root.name != DEFAULT_ROOT).then(|| root.name.clone()),
            root: root.extra(ROOT_KNOWN),
            disk_parameters: params.extra(PARAMS_KNOWN),
            storage_data: storage_data.extra(STORAGE_DATA_KNOWN),
            storage: storage.extra(STORAGE_KNOWN),
            snapshots: snaps.extra(SNAPSHOTS_KNOWN),
        };
        let mut d = Self {
            size_sectors,
            cylinders,
            heads,
            blocksize: blocksize as u32,
            preallocated,
            images,
            top_guid,
            snapshots,
            encryption_key_id,
            extras,
        };
        d.validate(path)?;
        if d.top_guid != TOP_GUID {
            // Older descriptors name the top with a GUID of its own; the
            // operations here, like libploop, expect the fixed one.
            if d.images.iter().any(|i| i.guid == TOP_GUID) {
                return Err(Error::Descriptor {
                    path: path.to_string(),
                    what: format!(
                        "the top is {} but another image has the top's GUID {}",
                        guid_string(&d.top_guid),
                        guid_string(&TOP_GUID)
                    ),
                });
            }
            d.rename_guid(d.top_guid, TOP_GUID);
        }
        Ok(d)
    }

    /// Structural checks: unique GUIDs, a shot for every image, a top that
    /// exists, parents that exist, and no cycles.
    pub fn validate(&self, path: &str) -> Result<()> {
        let bad = |what: String| Error::Descriptor {
            path: path.to_string(),
            what,
        };
        let mut seen = HashSet::new();
        let mut files = HashSet::new();
        for i in &self.images {
            if !seen.insert(i.guid) {
                return Err(bad(format!(
                    "image GUID {} appears twice",
                    guid_string(&i.guid)
                )));
            }
            let normal: PathBuf = Path::new(&i.file)
                .components()
                .filter(|c| !matches!(c, Component::CurDir))
                .collect();
            if !files.insert(normal) {
                return Err(bad(format!("image file {} is listed twice", i.file)));
            }
        }
        if self.snapshots.len() != self.images.len() {
            return Err(bad(format!(
                "{} images but {} snapshots",
                self.images.len(),
                self.snapshots.len()
            )));
        }
        let mut shots = HashSet::new();
        for s in &self.snapshots {
            if !shots.insert(s.guid) {
                return Err(bad(format!(
                    "snapshot {} appears twice",
                    guid_string(&s.guid)
                )));
            }
            if !seen.contains(&s.guid) {
                return Err(bad(format!(
                    "snapshot {} has no image",
                    guid_string(&s.guid)
                )));
            }
            if s.parent != NONE_GUID && !seen.contains(&s.parent) {
                return Err(bad(format!(
                    "snapshot {} has unknown parent {}",
                    guid_string(&s.guid),
                    guid_string(&s.parent)
                )));
            }
        }
        if !seen.contains(&self.top_guid) {
            return Err(bad(format!(
                "top delta {} is not found",
                guid_string(&self.top_guid)
            )));
        }
        // Every chain ends at the base within the depth limit, and has no
        // cycle: walked with a map of parents, so a long list costs little.
        let parents: std::collections::HashMap<Uuid, Uuid> =
            self.snapshots.iter().map(|s| (s.guid, s.parent)).collect();
        for s in &self.snapshots {
            let mut cur = s.guid;
            for depth in 0.. {
                if cur == NONE_GUID {
                    break;
                }
                if depth >= MAX_DELTAS {
                    // Deeper than allowed, or a cycle: say which.
                    return Err(bad(self.chain_guids(s.guid).err().unwrap_or_else(|| {
                        format!("chain is deeper than {MAX_DELTAS} deltas")
                    })));
                }
                cur = *parents
                    .get(&cur)
                    .ok_or_else(|| bad(format!("snapshot {} not found", guid_string(&cur))))?;
            }
        }
        Ok(())
    }

    pub fn shot(&self, guid: Uuid) -> Option<&Shot> {
        self.snapshots.iter().find(|s| s.guid == guid)
    }

    /// The base image: the one whose snapshot has no parent.
    pub fn base(&self) -> Option<&ImageEntry> {
        self.snapshots
            .iter()
            .find(|s| s.parent == NONE_GUID)
            .and_then(|s| self.image(s.guid))
    }

    pub fn image(&self, guid: Uuid) -> Option<&ImageEntry> {
        self.images.iter().find(|i| i.guid == guid)
    }

    pub fn children(&self, guid: Uuid) -> Vec<Uuid> {
        self.snapshots
            .iter()
            .filter(|s| s.parent == guid)
            .map(|s| s.guid)
            .collect()
    }

    /// GUIDs from `guid` down to the base (top first).
    fn chain_guids(&self, guid: Uuid) -> std::result::Result<Vec<Uuid>, String> {
        let mut out = Vec::new();
        let mut cur = guid;
        let mut seen = HashSet::new();
        while cur != NONE_GUID {
            if !seen.insert(cur) {
                return Err(format!(
                    "the snapshot tree has a cycle through {}",
                    guid_string(&cur)
                ));
            }
            if out.len() >= MAX_DELTAS {
                return Err(format!("chain is deeper than {MAX_DELTAS} deltas"));
            }
            let shot = self
                .shot(cur)
                .ok_or_else(|| format!("snapshot {} not found", guid_string(&cur)))?;
            out.push(cur);
            cur = shot.parent;
        }
        Ok(out)
    }

    /// The delta chain ending at `guid`, base first.
    pub fn chain(&self, guid: Uuid, path: &str) -> Result<Vec<&ImageEntry>> {
        let mut guids = self.chain_guids(guid).map_err(|what| Error::Descriptor {
            path: path.to_string(),
            what,
        })?;
        guids.reverse();
        Ok(guids
            .into_iter()
            .map(|g| self.image(g).expect("validated: every shot has an image"))
            .collect())
    }

    /// The child of a temporary snapshot that has exactly one: (parent,
    /// child) pairs of merges that were started and not finished.
    pub fn unfinished_merges(&self) -> Vec<(Uuid, Uuid)> {
        self.snapshots
            .iter()
            .filter(|s| s.temporary)
            .filter_map(|s| match self.children(s.guid).as_slice() {
                [only] => Some((s.guid, *only)),
                _ => None,
            })
            .collect()
    }

    /// Rename a GUID everywhere (image, shot, parents, top).
    pub fn rename_guid(&mut self, from: Uuid, to: Uuid) {
        for i in &mut self.images {
            if i.guid == from {
                i.guid = to;
            }
        }
        for s in &mut self.snapshots {
            if s.guid == from {
                s.guid = to;
            }
            if s.parent == from {
                s.parent = to;
            }
        }
        if self.top_guid == from {
            self.top_guid = to;
        }
    }

    /// Serialise as libploop does (two-space indent), with what was read
    /// and is not modelled put back where it was.
    pub fn to_xml(&self) -> String {
        let sectors = if self.cylinders != 0 && self.heads != 0 {
            self.size_sectors / (u64::from(self.cylinders) * u64::from(self.heads))
        } else {
            0
        };
        let e = &self.extras;
        let mut params = String::new();
        element(
            &mut params,
            2,
            "Disk_Parameters",
            &e.disk_parameters,
            &[
                ("Disk_size", leaf(4, "Disk_size", self.size_sectors)),
                ("Cylinders", leaf(4, "Cylinders", self.cylinders)),
                ("Heads", leaf(4, "Heads", self.heads)),
                ("Sectors", leaf(4, "Sectors", sectors)),
                ("Padding", leaf(4, "Padding", 0)),
            ],
        );
        let mut storage_known = vec![
            ("Start", leaf(6, "Start", 0)),
            ("End", leaf(6, "End", self.size_sectors)),
            ("Blocksize", leaf(6, "Blocksize", self.blocksize)),
        ];
        if self.preallocated {
            storage_known.push(("Preallocated", leaf(6, "Preallocated", 1)));
        }
        for i in &self.images {
            let mut img = String::new();
            element(
                &mut img,
                6,
                "Image",
                &i.extra,
                &[
                    ("GUID", leaf(8, "GUID", guid_string(&i.guid))),
                    ("Type", leaf(8, "Type", i.kind.as_str())),
                    ("File", leaf(8, "File", escape(&i.file))),
                ],
            );
            storage_known.push(("Image", img));
        }
        let mut storage = String::new();
        element(&mut storage, 4, "Storage", &e.storage, &storage_known);
        let mut storage_data = String::new();
        element(
            &mut storage_data,
            2,
            "StorageData",
            &e.storage_data,
            &[("Storage", storage)],
        );
        let mut snaps_known = vec![("TopGUID", leaf(4, "TopGUID", guid_string(&self.top_guid)))];
        for sh in &self.snapshots {
            let mut known = vec![
                ("GUID", leaf(6, "GUID", guid_string(&sh.guid))),
                ("ParentGUID", leaf(6, "ParentGUID", guid_string(&sh.parent))),
            ];
            if sh.temporary {
                known.push(("Temporary", "      <Temporary/>\n".to_string()));
            }
            let mut shot = String::new();
            element(&mut shot, 4, "Shot", &sh.extra, &known);
            snaps_known.push(("Shot", shot));
        }
        let mut snaps = String::new();
        element(&mut snaps, 2, "Snapshots", &e.snapshots, &snaps_known);
        let mut x = String::from("<?xml version=\"1.0\"?>\n");
        element(
            &mut x,
            0,
            e.root_name.as_deref().unwrap_or(DEFAULT_ROOT),
            &e.root,
            &[
                ("Disk_Parameters", params),
                ("StorageData", storage_data),
                ("Snapshots", snaps),
            ],
        );
        x
    }

    pub fn load(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let bytes = ploop_io::fsys::read(path).map_err(|e| Error::Descriptor {
            path: name.clone(),
            what: format!("cannot read: {e}"),
        })?;
        let text = String::from_utf8(bytes).map_err(|_| Error::Descriptor {
            path: name.clone(),
            what: "cannot read: not UTF-8 text".into(),
        })?;
        Self::parse(&text, &name)
    }

    /// Replace the file atomically: write a temporary, fsync, rename, fsync
    /// the folder.
    pub fn save(&self, path: &Path) -> Result<()> {
        let name = path.display().to_string();
        let err = |what: String| Error::Descriptor {
            path: name.clone(),
            what,
        };
        // Never write what would not load again.
        self.validate(&name)?;
        let tmp = path.with_extension("xml.tmp");
        ploop_io::fsys::write_synced(&tmp, self.to_xml().as_bytes())
            .and_then(|()| ploop_io::fsys::rename(&tmp, path))
            .map_err(|e| err(format!("cannot write: {e}")))?;
        // Renamed: the new descriptor is in effect, and callers act on it.
        // A failed folder sync only weakens durability across a power cut.
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Err(e) = ploop_io::fsys::sync_dir(dir.unwrap_or(Path::new("."))) {
            tracing::warn!("{name}: syncing the folder after an update: {e}");
        }
        Ok(())
    }
}

/// Where an image file named in a descriptor lives. Relative names are
/// taken from the descriptor's folder; neither kind may leave it.
pub fn resolve_image_path(dd_dir: &Path, file: &str, dd_path: &str) -> Result<PathBuf> {
    let bad = |what: String| Error::Descriptor {
        path: dd_path.to_string(),
        what,
    };
    let p = Path::new(file);
    let rel = if p.is_absolute() {
        let dir = dd_dir
            .canonicalize()
            .map_err(|e| bad(format!("cannot resolve folder {}: {e}", dd_dir.display())))?;
        p.strip_prefix(&dir)
            .map_err(|_| {
                bad(format!(
                    "image path {file} is outside the descriptor's folder {}",
                    dir.display()
                ))
            })?
            .to_path_buf()
    } else {
        p.to_path_buf()
    };
    // One plain name: a delta lives beside its descriptor, and is reached
    // without following links (a subfolder of a folder a container's
    // owner controls could be a link anywhere).
    let mut parts = rel.components().filter(|c| !matches!(c, Component::CurDir));
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(name)), None) => Ok(dd_dir.join(name)),
        (Some(Component::Normal(_)), Some(Component::Normal(_))) => Err(bad(format!(
            "image path {file} is in a subfolder: deltas live beside the descriptor"
        ))),
        _ => Err(bad(format!(
            "image path {file} leaves the descriptor's folder"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptor {
        let mut d =
            Descriptor::new_single(20971520, 2048, ImageType::Compressed, "root.hdd", false);
        let a = Uuid::from_u128(0xa);
        d.rename_guid(TOP_GUID, a);
        d.images.push(ImageEntry {
            guid: TOP_GUID,
            kind: ImageType::Compressed,
            file: "root.hdd.{f}".into(),
            extra: Extra::default(),
        });
        d.snapshots.push(Shot {
            guid: TOP_GUID,
            parent: a,
            temporary: false,
            extra: Extra::default(),
        });
        d.top_guid = TOP_GUID;
        d
    }

    /// An older descriptor whose top has a GUID of its own loads with the
    /// fixed top GUID, so that snapshots and deletes keep it loadable.
    #[test]
    fn an_old_top_guid_becomes_the_fixed_one() {
        let mut old = sample();
        let b = Uuid::from_u128(0xb);
        old.rename_guid(TOP_GUID, b);
        let back = Descriptor::parse(&old.to_xml(), "dd").unwrap();
        assert_eq!(back.top_guid, TOP_GUID);
        assert_eq!(back.chain(TOP_GUID, "dd").unwrap().len(), 2);
        assert!(back.images.iter().all(|i| i.guid != b));
        // A top GUID of its own beside an image holding the fixed one is
        // ambiguous: refused.
        let mut clash = old.clone();
        clash.rename_guid(Uuid::from_u128(0xa), TOP_GUID);
        let err = Descriptor::parse(&clash.to_xml(), "dd").unwrap_err();
        assert!(err.to_string().contains("another image"), "{err}");
    }

    #[test]
    fn roundtrip() {
        let d = sample();
        let x = d.to_xml();
        assert!(x.contains("<Disk_size>20971520</Disk_size>"));
        assert!(x.contains("<Cylinders>40960</Cylinders>"));
        assert!(x.contains("<Sectors>32</Sectors>"));
        let back = Descriptor::parse(&x, "dd").unwrap();
        assert_eq!(back, d);
        let chain = back.chain(TOP_GUID, "dd").unwrap();
        assert_eq!(chain[0].file, "root.hdd");
        assert_eq!(chain[1].file, "root.hdd.{f}");
    }

    #[test]
    fn accepts_other_root_name_and_openvz_sample() {
        let x = r#"<Parallels_disk_image_v2>
 <Disk_Parameters><Disk_size>20971520</Disk_size><Cylinders>20805</Cylinders>
  <Heads>16</Heads><Sectors>63</Sectors><Padding>0</Padding></Disk_Parameters>
 <StorageData><Storage><Start>0</Start><End>20971520</End><Blocksize>2048</Blocksize>
  <Image><GUID>{0000000a-0000-0000-0000-000000000000}</GUID><Type>Compressed</Type><File>root.hdd</File></Image>
  <Image><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><Type>Compressed</Type>
         <File>root.hdd.{F}</File></Image></Storage></StorageData>
 <Snapshots><TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>
  <Shot><GUID>{0000000a-0000-0000-0000-000000000000}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot>
  <Shot><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><ParentGUID>{0000000a-0000-0000-0000-000000000000}</ParentGUID></Shot>
 </Snapshots>
</Parallels_disk_image_v2>"#;
        let d = Descriptor::parse(x, "dd").unwrap();
        assert_eq!(d.images.len(), 2);
        assert_eq!(d.chain(TOP_GUID, "dd").unwrap().len(), 2);
    }

    fn expect_err(x: &str, needle: &str) {
        let e = Descriptor::parse(x, "dd.xml").unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should contain {needle:?}");
        assert!(e.starts_with("dd.xml: "), "{e:?} names the file");
    }

    #[test]
    fn rejects_cycles_and_junk() {
        let mut d = sample();
        let a = Uuid::from_u128(0xa);
        // base's parent = top: a cycle
        d.snapshots[0].parent = TOP_GUID;
        let _ = a;
        expect_err(&d.to_xml(), "cycle");
        expect_err("<a><b></a>", "malformed");
        expect_err(
            &format!("{}{}", "<a>".repeat(100_000), "</a>".repeat(100_000)),
            "nested",
        );
        expect_err("", "no root");
        let x = sample()
            .to_xml()
            .replace("<Blocksize>2048", "<Blocksize>2047");
        expect_err(&x, "Blocksize");
        let x = sample()
            .to_xml()
            .replace("<Disk_size>20971520", "<Disk_size>99999999999999999999999");
        expect_err(&x, "Disk_size");
        let x = sample().to_xml().replace(
            "{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID>\n        <Type>",
            "{5fbaabe3-6958-40ff-92a7-860e329aab42}</GUID>\n        <Type>",
        );
        expect_err(&x, "no image");
        // Two shots for one image (and none for the other).
        let mut d = sample();
        d.snapshots[0].guid = TOP_GUID;
        d.snapshots[0].parent = NONE_GUID;
        expect_err(&d.to_xml(), "appears twice");
    }

    /// An OpenVZ 9 descriptor with what we do not model: every element
    /// and attribute of it survives a rewrite, inside the element it was
    /// in and after the same sibling, and reads back equal.
    #[test]
    fn unknown_elements_and_attributes_survive_a_rewrite() {
        let x = r#"<?xml version="1.0"?>
<Virtuozzo_disk_image Version="3" xmlns:vz="urn:x">
  <Disk_Parameters>
    <Disk_size>2097152</Disk_size>
    <Max_delta_size>4194304</Max_delta_size>
    <Cylinders>2080</Cylinders>
    <Heads>16</Heads>
    <Sectors>63</Sectors>
    <Padding>0</Padding>
    <Encryption>
      <KeyId>key-&amp;-42</KeyId>
    </Encryption>
  </Disk_Parameters>
  <StorageData>
    <Volume><Parent>../base</Parent><ReadOnly/></Volume>
    <Storage>
      <Start>0</Start>
      <End>2097152</End>
      <Blocksize>2048</Blocksize>
      <Image vz:id="7">
        <GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID>
        <Type>Compressed</Type>
        <Model note="a &lt; b">fast</Model>
        <File>root.hds</File>
      </Image>
    </Storage>
  </StorageData>
  <Snapshots>
    <TopGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</TopGUID>
    <Shot>
      <GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID>
      <ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>
      <Created>2026-12-06</Created>
    </Shot>
  </Snapshots>
  <Trailer/>
</Virtuozzo_disk_image>
"#;
        let d = Descriptor::parse(x, "dd").unwrap();
        assert_eq!(d.encryption_key_id.as_deref(), Some("key-&-42"));
        let out = d.to_xml();
        for kept in [
            "<Virtuozzo_disk_image Version=\"3\" xmlns:vz=\"urn:x\">",
            "<Max_delta_size>4194304</Max_delta_size>",
            "<Encryption><KeyId>key-&amp;-42</KeyId></Encryption>",
            "<Volume><Parent>../base</Parent><ReadOnly/></Volume>",
            "<Image vz:id=\"7\">",
            "<Model note=\"a &lt; b\">fast</Model>",
            "<Created>2026-12-06</Created>",
            "<Trailer/>",
        ] {
            assert!(out.contains(kept), "{kept} lost:\n{out}");
        }
        // In place: after the sibling each followed, in its own parent.
        let at = |s: &str| out.find(s).unwrap();
        assert!(
            at("<Disk_size>") < at("<Max_delta_size>")
                && at("<Max_delta_size>") < at("<Cylinders>")
        );
        assert!(
            at("<Padding>") < at("<Encryption>") && at("<Encryption>") < at("</Disk_Parameters>")
        );
        assert!(at("<StorageData>") < at("<Volume>") && at("<Volume>") < at("<Storage>"));
        assert!(at("<Type>") < at("<Model") && at("<Model") < at("<File>"));
        assert!(at("<ParentGUID>") < at("<Created>") && at("<Created>") < at("</Shot>"));
        assert!(at("</Snapshots>") < at("<Trailer/>"));
        let back = Descriptor::parse(&out, "dd").unwrap();
        assert_eq!(back, d);
        assert_eq!(back.to_xml(), out, "a second rewrite changes nothing");
    }

    #[test]
    fn paths_stay_inside() {
        let dir = Path::new("/tmp");
        assert!(resolve_image_path(dir, "root.hdd", "dd").is_ok());
        assert!(resolve_image_path(dir, "../etc/passwd", "dd").is_err());
        assert!(resolve_image_path(dir, "/etc/passwd", "dd").is_err());
        assert!(resolve_image_path(dir, "a/../../x", "dd").is_err());
        assert!(resolve_image_path(dir, "d/precious", "dd").is_err());
        assert!(resolve_image_path(dir, "./root.hdd", "dd").is_ok());
    }
}
