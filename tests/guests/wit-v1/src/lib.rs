//! A component built against a future, incompatible `mint:plugin@1.0.0`, to check that the
//! host refuses it with both versions named.
wit_bindgen::generate!({
    inline: "
        package mint:plugin@1.0.0;
        interface node-policy {
            select: func(count: u32) -> list<u32>;
        }
        world node-policy-plugin {
            export node-policy;
        }
    ",
});
struct V1;
impl exports::mint::plugin::node_policy::Guest for V1 {
    fn select(count: u32) -> Vec<u32> {
        (0..count).collect()
    }
}
export!(V1);
