fn main() {
    println!("{}", xlb::dataplane::XDP_OBJECT.len());
}
