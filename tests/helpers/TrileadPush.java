// A push exactly as CloudStack's management server makes it (utils/.../ssh/SshHelper.java):
// one Trilead SSH2 connection for SCPClient.put into /var/cache/cloud/, then a second one
// for Session.execCommand("/opt/cloud/bin/update_config.py <file>") and its exit status.
//
// Run with Java 17's single-file launcher:
//   java -cp /usr/share/java/trilead-ssh2.jar TrileadPush.java HOST PORT PEMKEY FILE NAME
// Prints the negotiated algorithms, the command's stdout and stderr, and "exit=<status>";
// the process exits with the remote status (255 when the connection or login fails).

import com.trilead.ssh2.ChannelCondition;
import com.trilead.ssh2.Connection;
import com.trilead.ssh2.ConnectionInfo;
import com.trilead.ssh2.SCPClient;
import com.trilead.ssh2.Session;
import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;

public class TrileadPush {
    static final int TIMEOUT_MS = 30000;

    static Connection login(String host, int port, File key) throws Exception {
        Connection conn = new Connection(host, port);
        ConnectionInfo info = conn.connect(null, TIMEOUT_MS, TIMEOUT_MS);
        System.out.println("kex=" + info.keyExchangeAlgorithm
                + " hostkey=" + info.serverHostKeyAlgorithm
                + " cipher=" + info.clientToServerCryptoAlgorithm
                + " mac=" + info.clientToServerMACAlgorithm);
        if (!conn.authenticateWithPublicKey("root", key, null)) {
            conn.close();
            throw new Exception("authentication as root failed");
        }
        return conn;
    }

    static String drain(InputStream in) throws Exception {
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        in.transferTo(buf);
        return buf.toString(StandardCharsets.UTF_8);
    }

    public static void main(String[] args) throws Exception {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        File key = new File(args[2]);
        byte[] data = Files.readAllBytes(Paths.get(args[3]));
        String name = args[4];
        try {
            Connection up = login(host, port, key);
            try {
                new SCPClient(up).put(data, name, "/var/cache/cloud/", "0644");
            } finally {
                up.close();
            }
            Connection run = login(host, port, key);
            try {
                Session sess = run.openSession();
                sess.execCommand("/opt/cloud/bin/update_config.py " + name);
                // both streams at once, so neither can fill its window while the other is read
                String[] err = new String[1];
                InputStream stderr = sess.getStderr();
                Thread errReader = new Thread(() -> {
                    try {
                        err[0] = drain(stderr);
                    } catch (Exception e) {
                        err[0] = "(stderr unreadable: " + e + ")";
                    }
                });
                errReader.start();
                String out = drain(sess.getStdout());
                errReader.join(TIMEOUT_MS);
                sess.waitForCondition(ChannelCondition.EXIT_STATUS, TIMEOUT_MS);
                Integer status = sess.getExitStatus();
                sess.close();
                System.out.println("stdout=" + out.strip());
                System.out.println("stderr=" + (err[0] == null ? "" : err[0].strip()));
                System.out.println("exit=" + status);
                System.exit(status == null ? 254 : status);
            } finally {
                run.close();
            }
        } catch (Exception e) {
            System.out.println("error=" + e);
            Throwable cause = e.getCause();
            while (cause != null) {
                System.out.println("cause=" + cause);
                cause = cause.getCause();
            }
            System.exit(255);
        }
    }
}
