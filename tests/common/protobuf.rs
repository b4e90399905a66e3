//! `.proto` files compiled with protox for prost-reflect, independently of piiwall's own compile path: the
//! independent decoder of the Protobuf tests. piiwall's and Confluent's option files are added.

use std::collections::HashMap;

use prost_reflect::DescriptorPool;

struct Files(HashMap<String, String>);

impl protox::file::FileResolver for Files {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        match self.0.get(name) {
            Some(text) => protox::file::File::from_source(name, text),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// Compiles `root` among `files` (import path -> text).
pub fn pool(mut files: HashMap<String, String>, root: &str) -> DescriptorPool {
    files.insert("piiwall/pii.proto".into(), piiwall::policy::protobuf::PII_PROTO.into());
    files.insert(
        "confluent/meta.proto".into(),
        piiwall::policy::protobuf::META_PROTO.into(),
    );
    let mut chain = protox::file::ChainFileResolver::new();
    chain.add(Files(files));
    chain.add(protox::file::GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(chain);
    compiler.include_imports(true).open_file(root).expect("compiles");
    compiler.descriptor_pool()
}
