fn main() {
    println!("cargo:rustc-link-arg-bin=picocenter=-no-pie");
}
